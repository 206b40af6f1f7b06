r"""U-Net train-step and inference speed, JAX vs PyTorch (torch: pip install torch==2.13.0).

  python benchmarks/train_step.py          # widths 16/32/64, tiled 2048², 3D 64³; ~15 min
  python benchmarks/train_step.py --widths=16 --steps=5 --size3d=0
  python benchmarks/train_step.py --gpu_paper --batch=8   # accelerator: the paper model, MFU

The model is the project's `UNet(num_classes=2, width, depth=4, padding='SAME', norm='batch')` (the
CPU configuration of experiments/isbi.py), trained by the project's training step (`train_step` of
unet_jax/training/train_step.py) with Adam and cross-entropy + Dice, fp32. The JAX columns are the
same model with `model.conv_impl` = 'xla' (XLA's own convolutions and pooling: "stock"),
'portable' (the fast paths of unet_jax/models/fast_conv.py where they were measured faster, no
custom calls) and 'auto' (the default: on this CPU oneDNN's convolutions through FFI custom
calls, unet_jax/models/onednn/); `--impls` picks others ('fast', 'onednn'). The parameters are
the same. The PyTorch peer (torch_peer.py) is the same network in eager mode, channels_last (its
fastest eager layout on CPU; channels_last_3d in 3D; `--torch_layout=nchw` for the other),
`torch.set_num_threads(--threads)`, with weights copied from the JAX initialisation, so both
compute the same function: logits and loss are checked to agree before anything is timed.

Rows: per width (batch 4 of 1×256²) a training step and a forward pass; at `--tiled_width` the
overlap-tile prediction of one random 2048² image with 256² tiles (25 % overlap, Gaussian
blending; the JAX predictor end to end, host tiling and blending included) against torch's
forward pass over the same number of tile batches; and the 3D U-Net (width 16, depth 4, batch 1
of 1×64³) training step and forward pass.

JAX and PyTorch run in two worker processes driven in turn by this one, never at the same
time, so neither's idle thread pool competes with the other's work. Times are medians of
`--steps` timed runs after a warm-up run, interleaved stock / portable / auto / torch; the load
average is printed because the numbers are only comparable on an otherwise idle machine. The
JAX worker keeps freed host memory for reuse, as launch.py does (unet_jax/host_memory.py;
`--host_memory=default` for glibc's own allocator, which maps XLA's temporary buffer anew each
step); the PyTorch worker runs as torch does by default.
GFLOP/s counts the model's own FLOPs (unet_jax/models/flops.py: convolutions and matrix
products from the traced forward pass of the 'xla' model), ×3 for a training step.

After the speed table, a memory table (step_memory.py): for each remat policy (`model.remat`)
the activations saved for the backward pass (counted from the traced step, any backend) and
XLA's compiled estimate of the step's memory (arguments + outputs + temporaries) at each width,
and the saved activations of the paper model at 572×572, batch 8. XLA:CPU's scheduler does not
exploit remat, so the compiled estimate on CPU barely moves; on GPU --gpu_paper measures the
real peak.

--gpu_paper times the paper network instead (width 64, depth 4, VALID, 572×572 → 388×388,
bf16 compute, no normalisation) on the default accelerator and prints images/s, the model FLOP
utilisation against a measured bf16 matmul peak, and the device's peak memory per remat policy.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import time
import traceback
from typing import Any, Callable

import numpy as np

NUM_CLASSES = 2
DEPTH = 4
LEARNING_RATE = 1e-3


# --- the JAX side ----------------------------------------------------------------------------


def make_batch(batch: int, size: int, seed: int = 0, rank: int = 2) -> dict[str, np.ndarray]:
  """Images (batch, *(size,)*rank, 1) and labels (batch, *(size,)*rank) of two classes."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, *(size,) * rank, 1)).astype(np.float32)
  # Blobs rather than noise, so that both classes and the Dice term are non-trivial.
  field = rng.normal(size=(batch, *(size,) * rank))
  for axis in range(1, rank + 1):
    field = np.cumsum(field, axis)
  label = (field > 0).astype(np.int32)
  return {'image': image, 'label': label}


class JaxWorker:
  """Builds and times the JAX training step (and forward pass) per conv_impl ('stock' = 'xla')."""

  def __init__(self, keep_host_memory: bool = True):
    # As launch.py does by default, before JAX starts its threads.
    from unet_jax import host_memory  # pylint: disable=g-import-not-at-top
    self.kept = keep_host_memory and host_memory.keep_freed_memory()
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.runs: dict[str, dict[str, Any]] = {}

  def describe(self) -> str:
    jax = self.jax
    memory = 'freed host memory kept' if self.kept else "glibc's default allocator"
    return (f'jax {jax.__version__}, {jax.device_count()} × {jax.devices()[0].device_kind}, '
            f'{memory}')

  def setup(self, *, width: int, batch: int, size: int, norm: str, impls: tuple[str, ...],
            rank: int = 2) -> dict[str, np.ndarray]:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from unet_jax.models import UNet, flops  # pylint: disable=g-import-not-at-top
    from unet_jax.training import losses  # pylint: disable=g-import-not-at-top
    from unet_jax.training import train_step  # pylint: disable=g-import-not-at-top
    jax = self.jax
    tx = optax.adam(LEARNING_RATE)
    loss_fn = losses.make_loss({'cross_entropy': 1.0, 'dice': 1.0})
    data = make_batch(batch, size, rank=rank)
    self.batch = {k: jnp.asarray(v) for k, v in data.items()}
    self.runs = {}
    reference = None
    for impl in impls:
      model = UNet(num_classes=NUM_CLASSES, width=width, depth=DEPTH, padding='SAME', norm=norm,
                   conv_impl='xla' if impl == 'stock' else impl)
      state = train_step.init_state(jax.random.key(0), model=model, tx=tx,
                                    input_shape=(1, *(size,) * rank, 1), ema=False)
      if reference is None:
        reference = state
      elif (jax.tree.structure(state) != jax.tree.structure(reference)
            or jax.tree.map(jnp.shape, state) != jax.tree.map(jnp.shape, reference)):
        raise AssertionError(f'{impl}: parameter tree differs from the stock model')
      state = jax.tree.map(jnp.copy, reference)  # same initial weights for every impl
      step = jax.jit(functools.partial(train_step.train_step, model=model, tx=tx,
                                       loss_fn=loss_fn, schedule=lambda _: LEARNING_RATE),
                     donate_argnums=(0,)).lower(state, self.batch, jax.random.key(1)).compile()

      def loss_and_logits(params, batch_stats, batch):
        logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                                train=True, mutable=['batch_stats'])
        return loss_fn(logits, batch['label'])[0], logits

      check = jax.jit(loss_and_logits).lower(state.params, state.batch_stats,
                                             self.batch).compile()
      infer = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
          {'params': state.params, 'batch_stats': state.batch_stats},
          self.batch['image']).compile()
      self.runs[impl] = dict(step=step, check=check, infer=infer, state=state, model=model)
    variables = {'params': reference.params, 'batch_stats': reference.batch_stats}
    # The model's own FLOP count: one forward pass of the batch through the 'xla' model.
    self.forward_flops = flops.forward_flops(
        UNet(num_classes=NUM_CLASSES, width=width, depth=DEPTH, padding='SAME', norm=norm,
             conv_impl='xla'), variables, self.batch['image'].shape)
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}

  def flops(self) -> int:
    """FLOPs of one forward pass of the batch of the last `setup`."""
    return self.forward_flops

  def setup_tiled(self, *, image_size: int, tile: int) -> int:
    """Overlap-tile predictors (batch = the setup's batch, tiles of the setup's size) for each
    impl of the last `setup`, and a random image; returns the number of tile batches."""
    from unet_jax.inference import tiled  # pylint: disable=g-import-not-at-top
    self.image = np.random.default_rng(1).normal(size=(image_size, image_size, 1))
    self.image = self.image.astype(np.float32)
    for run in self.runs.values():
      variables = {'params': run['state'].params, 'batch_stats': run['state'].batch_stats}
      run['tiled'] = tiled.TiledPredictor.for_model(run['model'], variables, tile_size=tile,
                                                    batch_size=self.batch['image'].shape[0])
    predictor = next(iter(self.runs.values()))['tiled']
    return -(-len(predictor.plan(self.image.shape[:-1])) // predictor.batch_size)

  def tiled(self, *, impl: str) -> float:
    """Seconds to predict the image of `setup_tiled`, tiling and blending included."""
    start = time.perf_counter()
    self.runs[impl]['tiled'](self.image)
    return time.perf_counter() - start

  def outputs(self, *, impl: str) -> tuple[float, np.ndarray]:
    run = self.runs[impl]
    loss, logits = run['check'](run['state'].params, run['state'].batch_stats, self.batch)
    return float(loss), np.asarray(logits)

  def step(self, *, impl: str) -> float:
    run = self.runs[impl]
    start = time.perf_counter()
    run['state'], metrics = run['step'](run['state'], self.batch, self.jax.random.key(1))
    self.jax.block_until_ready((run['state'], metrics))
    return time.perf_counter() - start

  def forward(self, *, impl: str) -> float:
    run = self.runs[impl]
    variables = {'params': run['state'].params, 'batch_stats': run['state'].batch_stats}
    start = time.perf_counter()
    self.jax.block_until_ready(run['infer'](variables, self.batch['image']))
    return time.perf_counter() - start


# --- driving the two workers -----------------------------------------------------------------


def _serve(connection: Any, factory: Callable[..., Any], args: tuple[Any, ...]) -> None:
  try:
    worker = factory(*args)
  except SystemExit as exit_:
    connection.send(('exit', str(exit_)))
    return
  connection.send(('ok', None))
  while True:
    message = connection.recv()
    if message is None:
      return
    method, kwargs = message
    try:
      connection.send(('ok', getattr(worker, method)(**kwargs)))
    except Exception:  # pylint: disable=broad-except
      connection.send(('error', traceback.format_exc()))


class Worker:
  """A worker process holding `factory(*args)`; calls block until it answers."""

  def __init__(self, factory: Callable[..., Any], *args: Any):
    context = multiprocessing.get_context('spawn')
    self.connection, child = context.Pipe()
    self.process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
    self.process.start()
    status, message = self.connection.recv()
    if status == 'exit':
      raise SystemExit(message)

  def __call__(self, method: str, **kwargs: Any) -> Any:
    self.connection.send((method, kwargs))
    status, result = self.connection.recv()
    if status == 'error':
      raise RuntimeError(f'worker failed in {method}:\n{result}')
    return result

  def close(self) -> None:
    self.connection.send(None)
    self.process.join(timeout=30)


def _timed_rounds(calls: dict[str, Callable[[], float]], rounds: int,
                  pause: float) -> dict[str, list[float]]:
  """Times every call once per round, rotating the order; a pause lets idle threads sleep."""
  times = {name: [] for name in calls}
  names = list(calls)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      time.sleep(pause)
      times[name].append(calls[name]())
  return times


def _check_agreement(jax_worker: Worker, torch_worker: Worker | None, impls: list[str],
                     tolerance: float) -> str:
  loss, logits = jax_worker('outputs', impl='stock')
  scale = float(np.max(np.abs(logits)))
  report = []
  peers = [(impl, lambda impl=impl: jax_worker('outputs', impl=impl)) for impl in impls
           if impl != 'stock']
  if torch_worker is not None:
    peers.append(('torch', lambda: torch_worker('outputs')))
  for name, fetch in peers:
    other_loss, other_logits = fetch()
    error = float(np.max(np.abs(other_logits - logits))) / scale
    report.append(f'{name}: max |Δlogits|/max|logits| {error:.1e}, '
                  f'loss {other_loss:.6f} vs {loss:.6f}')
    if error > tolerance or abs(other_loss - loss) > tolerance * max(1.0, abs(loss)):
      raise SystemExit(f'{name} does not compute the same function as stock JAX: '
                       + report[-1])
  return '; '.join(report)


def _load() -> str:
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def _cases(args: argparse.Namespace) -> list[dict[str, Any]]:
  """The rows of the speed table: (model, passes) with the sizes each pass runs at."""
  cases = [dict(name=f'{w}', width=w, batch=args.batch, size=args.size, rank=2,
                passes=('train', 'forward') + (('tiled',) if w == args.tiled_width else ()))
           for w in (int(w) for w in args.widths.split(',') if w)]
  if args.size3d:
    cases.append(dict(name=f'3D {args.width3d}', width=args.width3d, batch=args.batch3d,
                      size=args.size3d, rank=3, passes=('train', 'forward')))
  return cases


def _time_pass(jax_worker: Worker, torch_worker: Worker | None, impls: list[str], mode: str,
               rounds: int, pause: float, tile_batches: int) -> dict[str, list[float]]:
  """Interleaved timings of one pass; 'tiled' is the whole image through the JAX predictor
  against torch's forward pass over the same number of tile batches."""
  method = {'train': 'step', 'forward': 'forward', 'tiled': 'tiled'}[mode]
  calls = {impl: (lambda impl=impl: jax_worker(method, impl=impl)) for impl in impls}
  if torch_worker and mode == 'tiled':
    calls['torch'] = lambda: sum(torch_worker('forward') for _ in range(tile_batches))
  elif torch_worker:
    calls['torch'] = lambda: torch_worker(method)
  for call in calls.values():  # warm-up: the first run of each touches fresh memory
    call()
  return _timed_rounds(calls, rounds, pause)


def run_cpu(args: argparse.Namespace) -> None:
  impls = ['stock'] + [i for i in args.impls.split(',') if i != 'stock']
  default_steps = {16: 5, 32: 3, 64: 2}
  # Not at the top: the tests load this file by path, without benchmarks/ on sys.path.
  import torch_peer  # pylint: disable=g-import-not-at-top
  jax_worker = Worker(JaxWorker, args.host_memory == 'keep')
  torch_worker = None if args.no_torch else Worker(torch_peer.TorchWorker, args.threads)
  print(f'{jax_worker("describe")}; '
        f'{torch_worker("describe") if torch_worker else "no torch"}; '
        f'{os.cpu_count()} CPUs; batch {args.batch}, 1×{args.size}×{args.size}, norm '
        f'{args.norm}, fp32, Adam, CE + Dice; torch layout {args.torch_layout}', flush=True)
  columns = impls + (['torch'] if torch_worker else [])
  label = {'stock': 'JAX stock', 'torch': f'torch ({args.torch_layout})'}
  names = [label.get(c, f'JAX {c}') for c in columns]
  header = ('| width | pass | ' + ' | '.join(f'{n} s' for n in names) + ' | img/s | GFLOP/s | '
            + ' | '.join(f'{label.get(i, i)}/torch' for i in impls if torch_worker)
            + (' | ' if torch_worker else '') + 'load 1/5/15 min |')
  rows = [header, '|' + ' --- |' * (header.count('|') - 1)]
  minima = []
  try:
    for case in _cases(args):
      batch, size, rank = case['batch'], case['size'], case['rank']
      variables = jax_worker('setup', width=case['width'], batch=batch, size=size,
                             norm=args.norm, impls=tuple(impls), rank=rank)
      params = sum(v.size for k, v in variables.items() if k.startswith("['params']"))
      if torch_worker:
        torch_worker('setup', width=case['width'], depth=DEPTH, num_classes=NUM_CLASSES,
                     norm=args.norm, layout=args.torch_layout, learning_rate=LEARNING_RATE,
                     variables=variables, data=make_batch(batch, size, rank=rank))
      agreement = _check_agreement(jax_worker, torch_worker, impls, args.tolerance)
      shape = '×'.join([str(size)] * rank)
      print(f'width {case["name"]} (batch {batch} of 1×{shape}): {params:,} parameters; '
            f'agreement before timing: {agreement}', flush=True)
      forward_flops = jax_worker('flops')
      tile_batches = 0
      for mode in case['passes']:
        images, flops = batch, forward_flops * (3 if mode == 'train' else 1)
        rounds = args.steps or default_steps.get(case['width'], 2)
        if mode == 'forward':
          rounds = max(rounds + 1, 3)
        if mode == 'tiled':
          tile_batches = jax_worker('setup_tiled', image_size=args.tiled_size, tile=size)
          images, flops, rounds = 1, forward_flops * tile_batches, args.tiled_rounds
        load = _load()
        times = _time_pass(jax_worker, torch_worker, impls, mode, rounds, args.pause,
                           tile_batches)
        median = {name: statistics.median(t) for name, t in times.items()}
        fastest = {name: min(t) for name, t in times.items()}
        cells = ' | '.join(f'{median[c]:.3f}' for c in columns)
        ips = ' / '.join(f'{images / median[c]:.2f}' for c in columns)
        gflops = ' / '.join(f'{flops / median[c] / 1e9:.0f}' for c in columns)
        ratios = ''.join(f'{median[i] / median["torch"]:.2f} | ' for i in impls if torch_worker)
        what = (f'tiled {args.tiled_size}², {tile_batches}×{batch} tiles' if mode == 'tiled'
                else mode)
        rows.append(f'| {case["name"]} | {what} | {cells} | {ips} | {gflops} | {ratios}'
                    f'{load} → {_load()} |')
        minima.append(f'| {case["name"]} | {what} | '
                      + ' | '.join(f'{fastest[c]:.3f}' for c in columns) + ' |')
        print(rows[-1], flush=True)
        print('    every timed run (s):', {n: [round(x, 3) for x in t] for n, t in times.items()},
              flush=True)
  finally:
    jax_worker.close()
    if torch_worker:
      torch_worker.close()
  print(f'\nMedians of interleaved runs; img/s and GFLOP/s in column order '
        f'({", ".join(names)}).\n')
  print('\n'.join(rows))
  print('\nFastest run of each (less sensitive to other load on the machine):\n')
  print('| width | pass | ' + ' | '.join(f'{n} s' for n in names) + ' |')
  print('|' + ' --- |' * (len(columns) + 2))
  print('\n'.join(minima))
  if not args.no_memory:
    import step_memory  # pylint: disable=g-import-not-at-top
    step_memory.run_memory(args, [int(w) for w in args.widths.split(',')])


# --- the paper model on an accelerator -------------------------------------------------------


def run_gpu_paper(args: argparse.Namespace) -> None:
  """Images/s, MFU and peak memory of the paper U-Net's training step per remat policy."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from unet_jax.models import UNet  # pylint: disable=g-import-not-at-top
  from unet_jax.models import flops as model_flops  # pylint: disable=g-import-not-at-top
  from unet_jax.training import losses  # pylint: disable=g-import-not-at-top
  from unet_jax.training import train_step  # pylint: disable=g-import-not-at-top

  n = args.matmul_size
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  start = time.perf_counter()
  for _ in range(10):
    result = matmul(a)
  jax.block_until_ready(result)
  peak = 10 * 2 * n**3 / (time.perf_counter() - start)
  del a, result

  size = args.tile
  out = UNet(num_classes=NUM_CLASSES, width=64, depth=DEPTH, padding='VALID').output_size(size)
  tx = optax.adam(LEARNING_RATE)
  loss_fn = losses.make_loss({'cross_entropy': 1.0, 'dice': 1.0})
  data = make_batch(args.batch, size)
  batch = {'image': jnp.asarray(data['image']),
           'label': jnp.asarray(data['label'][:, :out, :out])}
  paper = UNet(num_classes=NUM_CLASSES, width=64, depth=DEPTH, padding='VALID', conv_impl='xla')
  abstract = jax.eval_shape(paper.init, jax.random.key(0), jnp.zeros((1, size, size, 1)))
  flops = 3 * model_flops.forward_flops(paper, abstract, (args.batch, size, size, 1))
  device = jax.devices()[0]
  print(f'{device.device_kind}: paper U-Net, batch {args.batch}, {size}² → {out}², bf16 compute; '
        f'measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s\n')
  print('| remat | ms/step | images/s | TFLOP/s | MFU | XLA plan GiB | device peak GiB |')
  print('|' + ' --- |' * 7)
  # Least memory first: the device's peak counter only grows, so each reading is that policy's.
  for policy in ('full', 'conv', 'none'):
    model = UNet(num_classes=NUM_CLASSES, width=64, depth=DEPTH, padding='VALID', norm='none',
                 dtype=jnp.bfloat16, remat=policy)
    state = train_step.init_state(jax.random.key(0), model=model, tx=tx,
                                  input_shape=(1, size, size, 1), ema=False)
    step = jax.jit(functools.partial(train_step.train_step, model=model, tx=tx, loss_fn=loss_fn,
                                     schedule=lambda _: LEARNING_RATE), donate_argnums=(0,))
    compiled = step.lower(state, batch, jax.random.key(1)).compile()
    analysis = compiled.memory_analysis()
    plan = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes) / 2**30
    for _ in range(2):
      state, metrics = compiled(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps or 10):
      start = time.perf_counter()
      state, metrics = compiled(state, batch, jax.random.key(1))
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    stats = device.memory_stats() or {}
    device_peak = stats.get('peak_bytes_in_use')
    print(f'| {policy} | {seconds * 1e3:.1f} | {args.batch / seconds:.1f} | '
          f'{flops / seconds / 1e12:.1f} | {flops / seconds / peak:.1%} | {plan:.2f} | '
          + (f'{device_peak / 2**30:.2f}' if device_peak else 'n/a') + ' |', flush=True)
    del state, compiled


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--widths', default='16,32,64', help='2D widths (empty: none)')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--norm', default='batch', choices=('batch', 'none'))
  parser.add_argument('--impls', default='portable,auto',
                      help="conv_impls timed besides stock ('xla'), comma-separated: 'portable' "
                           "(no custom calls), 'auto' (oneDNN on this CPU), 'fast', 'onednn'")
  parser.add_argument('--tiled_width', type=int, default=16,
                      help='width whose rows add tiled inference of one --tiled_size² image')
  parser.add_argument('--tiled_size', type=int, default=2048)
  parser.add_argument('--tiled_rounds', type=int, default=3)
  parser.add_argument('--size3d', type=int, default=64, help='3D U-Net input size (0: none)')
  parser.add_argument('--width3d', type=int, default=16)
  parser.add_argument('--batch3d', type=int, default=1)
  parser.add_argument('--steps', type=int, default=0,
                      help='timed steps per row (default: 5 / 3 / 2 for widths 16 / 32 / 64)')
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument('--torch_layout', default='channels_last',
                      choices=('channels_last', 'nchw'))
  parser.add_argument('--no_torch', action='store_true', help='time JAX only')
  parser.add_argument('--no_memory', action='store_true', help='skip the memory table')
  parser.add_argument('--host_memory', choices=('keep', 'default'), default='keep',
                      help="JAX worker: 'keep' freed host memory as launch.py does "
                           "(unet_jax/host_memory.py), or glibc's default")
  parser.add_argument('--pause', type=float, default=0.5,
                      help='seconds of idle before each timed call')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='largest relative logit difference accepted before timing')
  parser.add_argument('--gpu_paper', action='store_true',
                      help='time the paper model on the default accelerator instead')
  parser.add_argument('--matmul_size', type=int, default=8192,
                      help='--gpu_paper: n of the n×n bf16 matmul that measures the peak')
  parser.add_argument('--tile', type=int, default=572,
                      help='--gpu_paper input size (a valid VALID size: 188 + 16·k)')
  args = parser.parse_args()
  start = time.perf_counter()
  if args.gpu_paper:
    run_gpu_paper(args)
  else:
    run_cpu(args)
  print(f'\n{time.perf_counter() - start:.0f} s in all')


if __name__ == '__main__':
  main()

r"""U-Net train-step speed and memory, JAX vs PyTorch (torch: pip install torch==2.13.0).

  python benchmarks/train_step.py          # widths 16/32/64, batch 4, 1×256×256, ~10 min
  python benchmarks/train_step.py --widths=16 --steps=5
  python benchmarks/train_step.py --gpu_paper --batch=8   # accelerator: the paper model, MFU

The model is the project's `UNet(num_classes=2, width, depth=4, padding='SAME', norm='batch')` (the
CPU configuration of experiments/isbi.py), trained by the project's training step (`train_step` of
unet_jax/training/train_step.py) with Adam and cross-entropy + Dice, fp32. The JAX columns are the
same model with `model.conv_impl` = 'xla' (XLA's own convolutions and pooling: "stock"), 'auto'
(what the library picks on this backend, the default) and 'fast' (every layer on the fast path; see
unet_jax/models/fast_conv.py); the parameters are the same. The PyTorch peer (torch_peer.py) is the
same network in eager mode, channels_last (its fastest eager layout on CPU; `--torch_layout=nchw`
for the other), `torch.set_num_threads(--threads)`, with weights copied from the JAX initialisation,
so both compute the same function: logits and loss are checked to agree before anything is timed.

JAX and PyTorch run in two worker processes driven in turn by this one, never at the same
time, so neither's idle thread pool competes with the other's work. Step times are medians of
`--steps` timed steps after a warm-up step, interleaved stock / fast / torch; the load average
is printed because the numbers are only comparable on an otherwise idle machine. GFLOP/s
counts the convolutions analytically: 2·k^d·C_in·C_out·(output pixels) per convolution
forward (transposed convolutions by input pixels), ×3 for a training step.

After the speed table, a memory table: for each remat policy (`model.remat`) the activations
saved for the backward pass (counted from the traced step, any backend) and XLA's compiled
estimate of the step's memory (arguments + outputs + temporaries) at each width, and the saved
activations of the paper model at 572×572, batch 8. XLA:CPU's scheduler does not exploit remat,
so the compiled estimate on CPU barely moves; on GPU --gpu_paper measures the real peak.

--gpu_paper times the paper network instead (width 64, depth 4, VALID, 572×572 → 388×388,
bf16 compute, no normalisation) on the default accelerator and prints images/s, the model FLOP
utilisation against a measured bf16 matmul peak, and the device's peak memory per remat policy.
"""

from __future__ import annotations

import argparse
import functools
import math
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


# --- FLOPs -----------------------------------------------------------------------------------


def unet_forward_flops(*, width: int, depth: int, size: int, padding: str, in_channels: int = 1,
                       num_classes: int = NUM_CLASSES) -> int:
  """Multiply-add FLOPs (×2) of one image through the U-Net's convolutions, 2D."""
  trim = 2 if padding == 'VALID' else 0  # pixels a 3×3 conv removes per spatial dim
  flops = 0

  def block(size: int, cin: int, cout: int) -> int:
    nonlocal flops
    for c in (cin, cout):
      size -= trim
      flops += 2 * 9 * c * cout * size * size
    return size

  sizes, channels = [], in_channels
  for level in range(depth + 1):
    if level:
      size //= 2
    size = block(size, channels, width * 2**level)
    channels = width * 2**level
    sizes.append(size)
  for level in reversed(range(depth)):
    cout = width * 2**level
    flops += 2 * 4 * channels * cout * size * size  # 2×2 up-convolution, per input pixel
    size *= 2
    size = block(size, 2 * cout, cout)
    channels = cout
  return flops + 2 * channels * num_classes * size * size


# --- the JAX side ----------------------------------------------------------------------------


def make_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
  # Blobs rather than noise, so that both classes and the Dice term are non-trivial.
  label = (np.cumsum(np.cumsum(rng.normal(size=(batch, size, size)), 1), 2) > 0).astype(np.int32)
  return {'image': image, 'label': label}


class JaxWorker:
  """Builds and times the JAX training step (and forward pass) per conv_impl ('stock' = 'xla')."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.runs: dict[str, dict[str, Any]] = {}

  def describe(self) -> str:
    jax = self.jax
    return f'jax {jax.__version__}, {jax.device_count()} × {jax.devices()[0].device_kind}'

  def setup(self, *, width: int, batch: int, size: int, norm: str, impls: tuple[str, ...]
            ) -> dict[str, np.ndarray]:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from unet_jax.models import UNet  # pylint: disable=g-import-not-at-top
    from unet_jax.training import losses  # pylint: disable=g-import-not-at-top
    from unet_jax.training import train_step  # pylint: disable=g-import-not-at-top
    jax = self.jax
    tx = optax.adam(LEARNING_RATE)
    loss_fn = losses.make_loss({'cross_entropy': 1.0, 'dice': 1.0})
    data = make_batch(batch, size)
    self.batch = {k: jnp.asarray(v) for k, v in data.items()}
    self.runs = {}
    reference = None
    for impl in impls:
      model = UNet(num_classes=NUM_CLASSES, width=width, depth=DEPTH, padding='SAME', norm=norm,
                   conv_impl='xla' if impl == 'stock' else impl)
      state = train_step.init_state(jax.random.key(0), model=model, tx=tx,
                                    input_shape=(1, size, size, 1), ema=False)
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
      self.runs[impl] = dict(step=step, check=check, infer=infer, state=state)
    flat = jax.tree_util.tree_flatten_with_path(
        {'params': reference.params, 'batch_stats': reference.batch_stats})[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}

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


def step_memory(*, model: Any, batch: int, size: int, out_size: int,
                compile_step: bool) -> tuple[float, float | None]:
  """MiB of activations saved for the backward pass, and of XLA's compiled step (or None).

  The saved activations are the residuals of `jax.vjp` of the loss, counted on the traced
  step (no device memory is touched), so they show what a remat policy keeps on any backend.
  The compiled figure is XLA's plan for the whole train step on this backend: arguments,
  outputs and temporaries (without donation, so the state is counted twice).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from unet_jax.training import losses  # pylint: disable=g-import-not-at-top
  from unet_jax.training import train_step  # pylint: disable=g-import-not-at-top
  tx = optax.adam(LEARNING_RATE)
  loss_fn = losses.make_loss({'cross_entropy': 1.0, 'dice': 1.0})
  data = {'image': jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32),
          'label': jax.ShapeDtypeStruct((batch, out_size, out_size), jnp.int32)}
  state = jax.eval_shape(functools.partial(train_step.init_state, model=model, tx=tx,
                                           input_shape=(1, size, size, 1), ema=False),
                         jax.random.key(0))

  def loss(params, batch_stats, batch):
    variables = {'params': params, 'batch_stats': batch_stats}
    logits, _ = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
    return loss_fn(logits, batch['label'])[0]

  def saved_for_backward(params, batch_stats, batch):
    return jax.tree.leaves(jax.vjp(lambda p: loss(p, batch_stats, batch), params)[1])

  residuals = jax.eval_shape(saved_for_backward, state.params, state.batch_stats, data)
  saved = sum(math.prod(r.shape) * r.dtype.itemsize for r in residuals) / 2**20
  if not compile_step:
    return saved, None
  step = functools.partial(train_step.train_step, model=model, tx=tx, loss_fn=loss_fn,
                           schedule=lambda _: LEARNING_RATE)
  analysis = jax.jit(step).lower(state, data, jax.random.key(1)).compile().memory_analysis()
  planned = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes) / 2**20
  return saved, planned


def run_memory(args: argparse.Namespace, widths: list[int]) -> None:
  """Saved activations and XLA's memory plan per remat policy (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unet_jax.models import UNet, blocks  # pylint: disable=g-import-not-at-top
  policies = blocks.REMAT_POLICIES
  print(f'\nMemory per remat policy ({jax.devices()[0].device_kind}; MiB): activations saved '
        'for the backward pass / XLA\'s compiled plan of the train step\n')
  print('| model | batch | input | dtype | ' + ' | '.join(policies) + ' |')
  print('|' + ' --- |' * (4 + len(policies)))
  # XLA's compiled plan only for the smallest width: on CPU it barely depends on remat, and
  # compiling the wider steps three more times would double the benchmark's run time.
  rows = [(f'width {w}, SAME, {args.norm}', args.batch, args.size, 'float32', w, 'SAME', args.norm,
           w == min(widths)) for w in widths]
  # The paper model at the tile size of the paper; counted only (compiling it on a CPU is slow).
  rows += [('paper (width 64, VALID)', 8, 572, dtype, 64, 'VALID', 'none', False)
           for dtype in ('float32', 'bfloat16')]
  for name, batch, size, dtype, width, padding, norm, compile_step in rows:
    cells = []
    for policy in policies:
      model = UNet(num_classes=NUM_CLASSES, width=width, depth=DEPTH, padding=padding, norm=norm,
                   remat=policy, dtype=jnp.dtype(dtype))
      saved, planned = step_memory(model=model, batch=batch, size=size, compile_step=compile_step,
                                   out_size=model.output_size(size))
      cells.append(f'{saved:,.0f}' + (f' / {planned:,.0f}' if planned is not None else ''))
    print(f'| {name} | {batch} | {size}² | {dtype} | ' + ' | '.join(cells) + ' |', flush=True)


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


def run_cpu(args: argparse.Namespace) -> None:
  widths = [int(w) for w in args.widths.split(',')]
  impls = ['stock'] + [i for i in args.impls.split(',') if i != 'stock']
  default_steps = {16: 5, 32: 3, 64: 2}
  # Not at the top: the tests load this file by path, without benchmarks/ on sys.path.
  import torch_peer  # pylint: disable=g-import-not-at-top
  jax_worker = Worker(JaxWorker)
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
    for width in widths:
      variables = jax_worker('setup', width=width, batch=args.batch, size=args.size,
                             norm=args.norm, impls=tuple(impls))
      params = sum(v.size for k, v in variables.items() if k.startswith("['params']"))
      if torch_worker:
        torch_worker('setup', width=width, depth=DEPTH, num_classes=NUM_CLASSES, norm=args.norm,
                     layout=args.torch_layout, learning_rate=LEARNING_RATE, variables=variables,
                     data=make_batch(args.batch, args.size))
      agreement = _check_agreement(jax_worker, torch_worker, impls, args.tolerance)
      print(f'width {width}: {params:,} parameters; agreement before timing: {agreement}',
            flush=True)
      flops = args.batch * unet_forward_flops(width=width, depth=DEPTH, size=args.size,
                                              padding='SAME')
      for mode, multiplier in (('train', 3), ('forward', 1)):
        method = 'step' if mode == 'train' else 'forward'
        calls = {impl: (lambda impl=impl: jax_worker(method, impl=impl)) for impl in impls}
        if torch_worker:
          calls['torch'] = lambda: torch_worker(method)
        for call in calls.values():  # warm-up: the first run of each touches fresh memory
          call()
        rounds = args.steps or default_steps.get(width, 2)
        if mode == 'forward':
          rounds = max(rounds + 1, 3)
        load = _load()
        times = _timed_rounds(calls, rounds, args.pause)
        median = {name: statistics.median(t) for name, t in times.items()}
        fastest = {name: min(t) for name, t in times.items()}
        cells = ' | '.join(f'{median[c]:.3f}' for c in columns)
        ips = ' / '.join(f'{args.batch / median[c]:.2f}' for c in columns)
        gflops = ' / '.join(f'{multiplier * flops / median[c] / 1e9:.0f}' for c in columns)
        ratios = ''.join(f'{median[i] / median["torch"]:.2f} | ' for i in impls if torch_worker)
        rows.append(f'| {width} | {mode} | {cells} | {ips} | {gflops} | {ratios}'
                    f'{load} → {_load()} |')
        minima.append(f'| {width} | {mode} | ' + ' | '.join(f'{fastest[c]:.3f}' for c in columns)
                      + ' |')
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
    run_memory(args, widths)


# --- the paper model on an accelerator -------------------------------------------------------


def run_gpu_paper(args: argparse.Namespace) -> None:
  """Images/s, MFU and peak memory of the paper U-Net's training step per remat policy."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from unet_jax.models import UNet  # pylint: disable=g-import-not-at-top
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
  flops = 3 * args.batch * unet_forward_flops(width=64, depth=DEPTH, size=size, padding='VALID')
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
  parser.add_argument('--widths', default='16,32,64')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--norm', default='batch', choices=('batch', 'none'))
  parser.add_argument('--impls', default='auto',
                      help="fast_conv impls timed besides stock: 'auto', 'fast' or both")
  parser.add_argument('--steps', type=int, default=0,
                      help='timed steps per row (default: 5 / 3 / 2 for widths 16 / 32 / 64)')
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument('--torch_layout', default='channels_last',
                      choices=('channels_last', 'nchw'))
  parser.add_argument('--no_torch', action='store_true', help='time JAX only')
  parser.add_argument('--no_memory', action='store_true', help='skip the memory table')
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

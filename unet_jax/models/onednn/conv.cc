// oneDNN convolutions and transposed convolutions (oneDNN's "deconvolution") for XLA:CPU as
// FFI custom calls: the forward pass, the input gradient and the kernel gradient, and an
// inference forward pass with a bias and a ReLU applied as oneDNN post-ops.
//
// Layouts are JAX's channels-last ones, row-major: x (N, *spatial, C_in), kernel
// (*kernel_size, C_in, C_out), y and dy (N, *spatial_out, C_out), for 1, 2 or 3 spatial dims.
// float32 only; no dilation, one feature group; any strides and non-negative (low, high) pads.
// A transposed convolution takes oneDNN's kernel orientation (torch's ConvTranspose one: output
// offset a of an input pixel takes tap a); the Python side flips lax's kernel to it.
//
// Why oneDNN chooses the kernel's layout (format_tag::any) and each call reorders the kernel
// into it: convolutions on a plain HWIO kernel fell back to a reference path 2–4× slower, and
// the reorder of a kernel is cheap next to the convolution itself.
//
// Why one mutex around every call: XLA may run independent custom calls at once (the two
// gradients of a layer, say), and two OpenMP teams on the same few cores run slower than one
// after the other. The OpenMP team has the process's thread count (set once from Python
// through unet_jax_onednn_set_threads).
//
// Why the CPUs are kept awake for a moment after each call (KeepAwake): XLA calls in from both
// threads of its pool, libgomp gives each calling thread an OpenMP team of its own, and with
// more OpenMP threads than CPUs it cuts its spin-wait to ~100 turns. A team's second thread
// therefore sleeps between calls, and after an idle pause a 2-vCPU VM takes about 30 ms of
// calls to wake it promptly again: the first calls of a pass ran at one thread's speed (the
// width-16 forward pass lost 30 ms of 72). Spinners at SCHED_IDLE, which any other thread
// preempts at once, keep the CPUs busy for KeepAwake's window after each call, so the team's
// second thread wakes on a running CPU.
//
// Primitives are created once per geometry (10–160 ms each) and kept for the process's life.
//
// Why every primitive takes its scratchpad from us (scratchpad_mode::user): with oneDNN's own
// per-thread scratchpad, the gemm kernel gradient of 3D convolutions (oneDNN 3.2, channels-last)
// now and then wrote outside its memory when XLA called in from its worker threads, and the
// process died. The calls run one at a time (the mutex), so one buffer, grown to the largest
// request, serves them all.

#include <omp.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;
constexpr auto kF32 = dnnl::memory::data_type::f32;

// Channels-last activations and JAX's (*kernel_size, C_in, C_out) kernels, by spatial rank.
const tag kActivationTags[] = {tag::nwc, tag::nhwc, tag::ndhwc};
const tag kKernelTags[] = {tag::wio, tag::hwio, tag::dhwio};

struct Geometry {
  int rank;
  dims src, weights, dst;  // oneDNN's logical order: (N, C, *spatial), (O, I, *kernel_size)
  dims strides, pad_lo, pad_hi;

  // The cache key: every number that shapes the primitives.
  std::vector<int64_t> Key() const {
    std::vector<int64_t> key = {rank};
    for (const dims* d : {&src, &weights, &dst, &strides, &pad_lo, &pad_hi}) {
      key.insert(key.end(), d->begin(), d->end());
    }
    return key;
  }
  dnnl::memory::desc Activations(const dims& d) const {
    return dnnl::memory::desc(d, kF32, kActivationTags[rank - 1]);
  }
  dnnl::memory::desc PlainKernel() const {
    return dnnl::memory::desc(weights, kF32, kKernelTags[rank - 1]);
  }
  dnnl::memory::desc AnyKernel() const { return dnnl::memory::desc(weights, kF32, tag::any); }
  dnnl::memory::desc Bias() const { return dnnl::memory::desc({weights[0]}, kF32, tag::a); }
};

// (N, *spatial, C) from XLA as oneDNN's (N, C, *spatial).
dims LogicalActivations(ffi::Span<const int64_t> shape) {
  dims d = {shape[0], shape[shape.size() - 1]};
  for (size_t i = 1; i + 1 < shape.size(); ++i) d.push_back(shape[i]);
  return d;
}

// (*kernel_size, I, O) from XLA as oneDNN's (O, I, *kernel_size).
dims LogicalKernel(ffi::Span<const int64_t> shape) {
  const size_t r = shape.size();
  dims d = {shape[r - 1], shape[r - 2]};
  for (size_t i = 0; i + 2 < r; ++i) d.push_back(shape[i]);
  return d;
}

dims ToDims(ffi::Span<const int64_t> values) { return dims(values.begin(), values.end()); }

// The oneDNN primitive families of a convolution and of a transposed convolution.
struct Convolution {
  using Fwd = dnnl::convolution_forward;
  using BwdData = dnnl::convolution_backward_data;
  using BwdWeights = dnnl::convolution_backward_weights;
  static constexpr dnnl::algorithm kAlgorithm = dnnl::algorithm::convolution_direct;
};
struct Deconvolution {
  using Fwd = dnnl::deconvolution_forward;
  using BwdData = dnnl::deconvolution_backward_data;
  using BwdWeights = dnnl::deconvolution_backward_weights;
  static constexpr dnnl::algorithm kAlgorithm = dnnl::algorithm::deconvolution_direct;
};

// A forward primitive's kernel: `reorder` from the caller's plain kernel into `buffer`, in the
// layout the primitive chose (empty when it takes the plain kernel), and the plain kernel it was
// last reordered from, so that an unchanged kernel is not reordered again (ReorderedKernel).
struct ForwardKernel {
  dnnl::reorder reorder;
  dnnl::memory buffer;
  std::vector<char> source;
};

// One geometry's primitives. The backward ones are made on the first backward call, so a
// forward-only program (inference) never pays for them.
template <typename Kind>
struct Conv {
  typename Kind::Fwd::primitive_desc fwd_pd;
  typename Kind::Fwd fwd;
  ForwardKernel fwd_kernel;

  bool has_backward = false;
  typename Kind::BwdData::primitive_desc bwd_data_pd;
  typename Kind::BwdData bwd_data;
  dnnl::reorder to_bwd_data_kernel;
  dnnl::memory bwd_data_kernel;
  typename Kind::BwdWeights::primitive_desc bwd_weights_pd;
  typename Kind::BwdWeights bwd_weights;
  dnnl::reorder to_plain_kernel_grad;  // bwd_weights' layout → plain kernel gradient
  dnnl::memory bwd_kernel_grad;
};

template <typename Kind>
using Cache = std::map<std::vector<int64_t>, std::unique_ptr<Conv<Kind>>>;

// An inference convolution with a per-channel bias and, optionally, a ReLU applied by oneDNN as
// the output is written (a post-op): evaluation folds batch norm into kernel and bias.
struct Epilogue {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  ForwardKernel fwd_kernel;
};
using EpilogueCache = std::map<std::vector<int64_t>, std::unique_ptr<Epilogue>>;

// Threads that spin at SCHED_IDLE until `window_us` after the last Touch(), then sleep until
// the next. A spinner whose scheduling policy cannot be set exits instead: at normal priority
// it would take CPU time from the work.
class KeepAwake {
 public:
  KeepAwake(int spinners, int64_t window_us) : window_us_(window_us) {
    for (int i = 0; i < spinners; ++i) std::thread([this] { Spin(); }).detach();
  }

  // Sequentially consistent: either this call sees a spinner about to sleep and wakes it, or
  // that spinner sees the new deadline and does not sleep.
  void Touch() {
    deadline_us_.store(NowUs() + window_us_);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
  }

 private:
  static int64_t NowUs() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  bool Due() const { return NowUs() < deadline_us_.load(); }

  void Spin() {
    pthread_setname_np(pthread_self(), "onednn-awake");
    sched_param param{};
    if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &param) != 0) return;
    for (;;) {
      while (Due()) __builtin_ia32_pause();
      std::unique_lock<std::mutex> lock(mutex_);
      sleeping_.fetch_add(1);
      wake_.wait(lock, [this] { return Due(); });
      sleeping_.fetch_sub(1);
    }
  }

  const int64_t window_us_;
  std::atomic<int64_t> deadline_us_{0};
  std::atomic<int> sleeping_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

struct State {
  std::mutex mutex;
  KeepAwake* awake = nullptr;  // never destroyed, like the state; none until set
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  Cache<Convolution> convolutions;
  Cache<Deconvolution> deconvolutions;
  EpilogueCache epilogues;
  int threads = 0;  // 0: OpenMP's default
  void* scratchpad = nullptr;  // shared by every call (they run one at a time)
  size_t scratchpad_bytes = 0;

  // The scratchpad `desc` asks for, over the shared buffer (grown when it is too small).
  dnnl::memory Scratchpad(const dnnl::memory::desc& desc) {
    const size_t bytes = desc.get_size();
    if (bytes > scratchpad_bytes) {
      std::free(scratchpad);
      constexpr size_t kPage = 4096;
      scratchpad_bytes = (bytes + kPage - 1) / kPage * kPage;
      scratchpad = std::aligned_alloc(kPage, scratchpad_bytes);
      if (scratchpad == nullptr) {
        scratchpad_bytes = 0;
        throw dnnl::error(dnnl_out_of_memory, "could not allocate the scratchpad");
      }
    }
    return dnnl::memory(desc, engine, scratchpad);
  }
};

// Primitive attributes with the scratchpad left to the caller (see the top of this file).
dnnl::primitive_attr UserScratchpad(dnnl::primitive_attr attributes = dnnl::primitive_attr()) {
  attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attributes;
}

// Runs `primitive` (made from `pd`) on the state's stream with the shared scratchpad.
void Execute(State& state, const dnnl::primitive& primitive, const dnnl::primitive_desc_base& pd,
             std::unordered_map<int, dnnl::memory> args) {
  args.emplace(DNNL_ARG_SCRATCHPAD, state.Scratchpad(pd.scratchpad_desc()));
  primitive.execute(state.stream, args);
}

Cache<Convolution>& CacheOf(State& state, Convolution) { return state.convolutions; }
Cache<Deconvolution>& CacheOf(State& state, Deconvolution) { return state.deconvolutions; }

State& GetState() {
  static State* state = new State();  // never destroyed: XLA may call in during exit
  return *state;
}

// A plain (user) memory over an XLA buffer; oneDNN does not take ownership.
dnnl::memory Wrap(const dnnl::memory::desc& desc, const dnnl::engine& engine, const void* data) {
  return dnnl::memory(desc, engine, const_cast<void*>(data));
}

// `reorder` from `from` into `to` unless the layouts match; returns what holds the result.
dnnl::memory Reordered(dnnl::reorder& reorder, dnnl::memory& from, dnnl::memory& to,
                       dnnl::stream& stream) {
  if (!reorder) return from;
  reorder.execute(stream, from, to);
  return to;
}

// `Reordered` for a forward kernel, skipped while the caller's kernel `plain` holds the same
// bytes as at the last reorder: inference runs every tile batch with one set of weights, and the
// reorders were ~5% of its oneDNN time. A training step changes every kernel, so there the
// comparison stops at the first bytes.
dnnl::memory ReorderedKernel(ForwardKernel& kernel, dnnl::memory& plain, dnnl::stream& stream) {
  if (!kernel.reorder) return plain;
  const size_t bytes = plain.get_desc().get_size();
  const char* data = static_cast<const char*>(plain.get_data_handle());
  std::vector<char>& last = kernel.source;
  if (last.size() == bytes && std::memcmp(last.data(), data, bytes) == 0) return kernel.buffer;
  kernel.reorder.execute(stream, plain, kernel.buffer);
  last.assign(data, data + bytes);
  return kernel.buffer;
}

// Prepares `reorder` from the plain kernel into `layout` and the `buffer` it writes, unless
// the primitive takes the plain kernel.
void KernelInto(State& state, const Geometry& g, const dnnl::memory::desc& layout,
                dnnl::reorder& reorder, dnnl::memory& buffer) {
  if (layout == g.PlainKernel()) return;
  buffer = dnnl::memory(layout, state.engine);
  reorder = dnnl::reorder(
      dnnl::reorder::primitive_desc(state.engine, g.PlainKernel(), state.engine, layout));
}

template <typename Kind>
Conv<Kind>& Forward(State& state, const Geometry& g) {
  auto& slot = CacheOf(state, Kind())[g.Key()];
  if (slot) return *slot;
  auto conv = std::make_unique<Conv<Kind>>();
  conv->fwd_pd = typename Kind::Fwd::primitive_desc(
      state.engine, dnnl::prop_kind::forward_training, Kind::kAlgorithm, g.Activations(g.src),
      g.AnyKernel(), g.Activations(g.dst), g.strides, g.pad_lo, g.pad_hi, UserScratchpad());
  conv->fwd = typename Kind::Fwd(conv->fwd_pd);
  KernelInto(state, g, conv->fwd_pd.weights_desc(), conv->fwd_kernel.reorder,
             conv->fwd_kernel.buffer);
  slot = std::move(conv);
  return *slot;
}

template <typename Kind>
Conv<Kind>& Backward(State& state, const Geometry& g) {
  Conv<Kind>& conv = Forward<Kind>(state, g);
  if (conv.has_backward) return conv;
  auto& data_pd = conv.bwd_data_pd = typename Kind::BwdData::primitive_desc(
      state.engine, Kind::kAlgorithm, g.Activations(g.src), g.AnyKernel(), g.Activations(g.dst),
      g.strides, g.pad_lo, g.pad_hi, conv.fwd_pd, UserScratchpad());
  conv.bwd_data = typename Kind::BwdData(data_pd);
  KernelInto(state, g, data_pd.weights_desc(), conv.to_bwd_data_kernel, conv.bwd_data_kernel);
  auto& weights_pd = conv.bwd_weights_pd = typename Kind::BwdWeights::primitive_desc(
      state.engine, Kind::kAlgorithm, g.Activations(g.src), g.AnyKernel(), g.Activations(g.dst),
      g.strides, g.pad_lo, g.pad_hi, conv.fwd_pd, UserScratchpad());
  conv.bwd_weights = typename Kind::BwdWeights(weights_pd);
  if (weights_pd.diff_weights_desc() != g.PlainKernel()) {
    conv.bwd_kernel_grad = dnnl::memory(weights_pd.diff_weights_desc(), state.engine);
    conv.to_plain_kernel_grad = dnnl::reorder(dnnl::reorder::primitive_desc(
        state.engine, weights_pd.diff_weights_desc(), state.engine, g.PlainKernel()));
  }
  conv.has_backward = true;
  return conv;
}

ffi::Error CheckAttributes(const Geometry& g) {
  if (g.rank < 1 || g.rank > 3) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "onednn conv: 1-3 spatial dims only");
  }
  for (const dims* d : {&g.strides, &g.pad_lo, &g.pad_hi}) {
    if (static_cast<int>(d->size()) != g.rank) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "onednn conv: strides and pads need one entry per spatial dim");
    }
  }
  return ffi::Error::Success();
}

template <typename Body>
ffi::Error Guarded(Body body) {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.threads > 0) omp_set_num_threads(state.threads);
  if (state.awake) state.awake->Touch();
  try {
    body(state);
    state.stream.wait();
    if (state.awake) state.awake->Touch();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  return Geometry{static_cast<int>(x.size()) - 2, LogicalActivations(x), LogicalKernel(kernel),
                  LogicalActivations(y), ToDims(strides), ToDims(pad_lo), ToDims(pad_hi)};
}

template <typename Kind>
ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                           ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  const Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), strides,
                                  pad_lo, pad_hi);
  if (auto error = CheckAttributes(g); error.failure()) return error;
  return Guarded([&](State& state) {
    Conv<Kind>& conv = Forward<Kind>(state, g);
    auto user_kernel = Wrap(g.PlainKernel(), state.engine, kernel.untyped_data());
    auto weights = ReorderedKernel(conv.fwd_kernel, user_kernel, state.stream);
    Execute(state, conv.fwd, conv.fwd_pd,
            {{DNNL_ARG_SRC, Wrap(g.Activations(g.src), state.engine, x.untyped_data())},
             {DNNL_ARG_WEIGHTS, weights},
             {DNNL_ARG_DST, Wrap(g.Activations(g.dst), state.engine, y->untyped_data())}});
  });
}

Epilogue& ForwardEpilogue(State& state, const Geometry& g, bool relu) {
  std::vector<int64_t> key = g.Key();
  key.push_back(relu);
  auto& slot = state.epilogues[key];
  if (slot) return *slot;
  auto conv = std::make_unique<Epilogue>();
  dnnl::primitive_attr attributes = UserScratchpad();
  if (relu) {
    dnnl::post_ops ops;
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attributes.set_post_ops(ops);
  }
  auto& pd = conv->fwd_pd = dnnl::convolution_forward::primitive_desc(
      state.engine, dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      g.Activations(g.src), g.AnyKernel(), g.Bias(), g.Activations(g.dst), g.strides, g.pad_lo,
      g.pad_hi, attributes);
  conv->fwd = dnnl::convolution_forward(pd);
  KernelInto(state, g, pd.weights_desc(), conv->fwd_kernel.reorder, conv->fwd_kernel.buffer);
  slot = std::move(conv);
  return *slot;
}

// y = conv(x, kernel) + bias, then max(y, 0) if `relu` is non-zero.
ffi::Error ForwardEpilogueImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                               ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                               ffi::Span<const int64_t> pad_hi, int64_t relu) {
  const Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), strides,
                                  pad_lo, pad_hi);
  if (auto error = CheckAttributes(g); error.failure()) return error;
  return Guarded([&](State& state) {
    Epilogue& conv = ForwardEpilogue(state, g, relu != 0);
    auto user_kernel = Wrap(g.PlainKernel(), state.engine, kernel.untyped_data());
    auto weights = ReorderedKernel(conv.fwd_kernel, user_kernel, state.stream);
    Execute(state, conv.fwd, conv.fwd_pd,
            {{DNNL_ARG_SRC, Wrap(g.Activations(g.src), state.engine, x.untyped_data())},
             {DNNL_ARG_WEIGHTS, weights},
             {DNNL_ARG_BIAS, Wrap(g.Bias(), state.engine, bias.untyped_data())},
             {DNNL_ARG_DST, Wrap(g.Activations(g.dst), state.engine, y->untyped_data())}});
  });
}

// dx of y = conv(x, kernel) given dy. A call of its own, so that XLA drops it where dx is
// not needed (the first layer, whose input is the image).
template <typename Kind>
ffi::Error BackwardDataImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                            ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                            ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                            ffi::Span<const int64_t> pad_hi) {
  const Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), dy.dimensions(), strides,
                                  pad_lo, pad_hi);
  if (auto error = CheckAttributes(g); error.failure()) return error;
  return Guarded([&](State& state) {
    Conv<Kind>& conv = Backward<Kind>(state, g);
    auto user_kernel = Wrap(g.PlainKernel(), state.engine, kernel.untyped_data());
    auto weights = Reordered(conv.to_bwd_data_kernel, user_kernel, conv.bwd_data_kernel,
                             state.stream);
    Execute(state, conv.bwd_data, conv.bwd_data_pd,
            {{DNNL_ARG_DIFF_DST, Wrap(g.Activations(g.dst), state.engine, dy.untyped_data())},
             {DNNL_ARG_WEIGHTS, weights},
             {DNNL_ARG_DIFF_SRC, Wrap(g.Activations(g.src), state.engine, dx->untyped_data())}});
  });
}

// dkernel of y = conv(x, kernel) given dy (x's shape is read from x, the kernel's from the
// result).
template <typename Kind>
ffi::Error BackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dkernel,
                               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                               ffi::Span<const int64_t> pad_hi) {
  const Geometry g = MakeGeometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(),
                                  strides, pad_lo, pad_hi);
  if (auto error = CheckAttributes(g); error.failure()) return error;
  return Guarded([&](State& state) {
    Conv<Kind>& conv = Backward<Kind>(state, g);
    auto plain_grad = Wrap(g.PlainKernel(), state.engine, dkernel->untyped_data());
    auto grad = conv.to_plain_kernel_grad ? conv.bwd_kernel_grad : plain_grad;
    Execute(state, conv.bwd_weights, conv.bwd_weights_pd,
            {{DNNL_ARG_SRC, Wrap(g.Activations(g.src), state.engine, x.untyped_data())},
             {DNNL_ARG_DIFF_DST, Wrap(g.Activations(g.dst), state.engine, dy.untyped_data())},
             {DNNL_ARG_DIFF_WEIGHTS, grad}});
    if (conv.to_plain_kernel_grad) conv.to_plain_kernel_grad.execute(state.stream, grad,
                                                                     plain_grad);
  });
}

}  // namespace

// Bindings by the number of array arguments; every handler returns one array and takes the
// convolution's strides and pads.
#define UNET_JAX_ARRAYS_2 ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
#define UNET_JAX_ARRAYS_3 UNET_JAX_ARRAYS_2.Arg<ffi::Buffer<ffi::F32>>()
#define UNET_JAX_GEOMETRY                         \
  .Ret<ffi::Buffer<ffi::F32>>()                   \
      .Attr<ffi::Span<const int64_t>>("strides")  \
      .Attr<ffi::Span<const int64_t>>("pad_lo")   \
      .Attr<ffi::Span<const int64_t>>("pad_hi")

// (x, kernel) → y; (x, kernel, dy) → dx; (x, dy) → dkernel.
#define UNET_JAX_HANDLERS(prefix, kind)                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(prefix##Forward, ForwardImpl<kind>,                      \
                                UNET_JAX_ARRAYS_2 UNET_JAX_GEOMETRY);                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(prefix##BackwardData, BackwardDataImpl<kind>,            \
                                UNET_JAX_ARRAYS_3 UNET_JAX_GEOMETRY);                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(prefix##BackwardWeights, BackwardWeightsImpl<kind>,      \
                                UNET_JAX_ARRAYS_2 UNET_JAX_GEOMETRY)

UNET_JAX_HANDLERS(UnetJaxOnednnConv, Convolution);
UNET_JAX_HANDLERS(UnetJaxOnednnDeconv, Deconvolution);
// (x, kernel, bias) → y, with the ReLU if "relu" is non-zero.
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetJaxOnednnConvForwardEpilogue, ForwardEpilogueImpl,
                              UNET_JAX_ARRAYS_3 UNET_JAX_GEOMETRY.Attr<int64_t>("relu"));

// The OpenMP team size of every later call; Python passes the process's CPU count.
extern "C" void unet_jax_onednn_set_threads(int threads) {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.threads = threads;
}

// From Python, after unet_jax_onednn_set_threads: one spinner per thread of the team, keeping
// the CPUs awake `window_ms` after each call (KeepAwake); 0 or a team of one thread: none.
// Once only: later calls change nothing.
extern "C" void unet_jax_onednn_keep_awake(double window_ms) {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.awake || window_ms <= 0 || state.threads < 2) return;
  state.awake = new KeepAwake(state.threads, static_cast<int64_t>(window_ms * 1000));
}

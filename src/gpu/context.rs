//! GPU context room: adapter choice, device with the adapter's real limits, environment
//! knobs (read once here), the typed pipeline cache, the buffer pool, the per-encoder uniform
//! ring, uploads/readbacks and the binding-window helper that lets kernels work on tensors
//! larger than one storage binding.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use super::timer::PassTimer;

pub use super::kernels::Shader;
use super::kernels::attention::AttnKernel;
use super::kernels::matmul::NtKernel;

/// Environment variable naming the adapter (substring of its name, or its index).
pub const ADAPTER_ENV: &str = "LORAP_ADAPTER";
/// Environment variable capping the storage-binding size in bytes (testing, debugging).
pub const MAX_BINDING_ENV: &str = "LORAP_MAX_BINDING";
/// Environment variable forcing the A B^T matmul kernel (`tiled` or `vec4`; comparisons).
pub const NT_KERNEL_ENV: &str = "LORAP_NT_KERNEL";
/// Environment variable turning the timestamp-query pass timer off (`off`; it is on where
/// the adapter has timestamp queries).
pub const GPU_TIMING_ENV: &str = "LORAP_GPU_TIMING";
/// Environment variable forcing the attention kernel (`rows` or `flash`; comparisons).
pub const ATTENTION_KERNEL_ENV: &str = "LORAP_ATTENTION_KERNEL";
/// Environment variable turning the cooperative-matrix (tensor core) path off (`off`).
pub const COOP_ENV: &str = "LORAP_COOPERATIVE_MATRIX";
/// Environment variable choosing how shader modules are compiled (`checked` or `trusted`).
pub const SHADER_CHECKS_ENV: &str = "LORAP_SHADER_CHECKS";
/// Environment variable forcing where the compensations' dense products and solves run
/// (`gpu` or `host`; default: the GPU, the host on CPU adapters).
pub const DENSE_SOLVES_ENV: &str = "LORAP_DENSE_SOLVES";

/// How wgpu compiles our WGSL modules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShaderChecks {
    /// No injected runtime checks (no index clamps, no loop-bounding counters): the checks
    /// stop GPU drivers from unrolling the accumulator loops and cost 10-100x on some GPUs
    /// (gfx-rs/wgpu #7698, #6521). Sound because every kernel guards its own indices exactly
    /// (each room's `*_exact_guards` test runs awkward shapes with NaN sentinels around
    /// the operands) and every loop has a bound from its parameters.
    #[default]
    Trusted,
    /// wgpu's default: bounds clamps and `force_loop_bounding` (a fallback for debugging a
    /// driver, or an untrusted build).
    Checked,
}

impl ShaderChecks {
    /// Parses `checked` / `trusted` (the environment knob's values).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "checked" => Some(ShaderChecks::Checked),
            "trusted" => Some(ShaderChecks::Trusted),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found for backends {backends:?}. Install a Vulkan driver (Linux without a GPU: \
         `apt-get install mesa-vulkan-drivers libvulkan1` gives the software driver lavapipe), \
         or choose other backends with WGPU_BACKEND=vulkan|metal|dx12|gl"
    )]
    NoAdapter { backends: wgpu::Backends },
    #[error("no adapter matches {wanted:?}; available: {available}")]
    AdapterNotFound { wanted: String, available: String },
    #[error("could not open the GPU device on {adapter}: {source}")]
    RequestDevice { adapter: String, source: wgpu::RequestDeviceError },
    #[error("GPU error: {0}")]
    Device(String),
    #[error("GPU out of memory: {0}. Lower --batch-tokens or --samples, or use a GPU with more memory")]
    OutOfMemory(String),
    #[error("GPU memory budget exceeded: {need} bytes needed with {live} bytes in use, over the --max-vram budget of {budget} bytes. Raise --max-vram or lower --batch-tokens")]
    OverBudget { need: u64, live: u64, budget: u64 },
    #[error("GPU device lost ({0}); the driver may have reset. Nothing was written; run again")]
    DeviceLost(String),
    #[error("{MAX_BINDING_ENV} must be a byte count, got {0:?}")]
    BadBindingEnv(String),
    #[error("{SHADER_CHECKS_ENV} must be `checked` or `trusted`, got {0:?}")]
    BadShaderChecksEnv(String),
    #[error("a single row of {row_bytes} bytes exceeds the storage binding limit of {limit} bytes")]
    RowTooLarge { row_bytes: u64, limit: u64 },
    #[error("buffer of {bytes} bytes exceeds the adapter's maximum buffer size of {limit} bytes")]
    BufferTooLarge { bytes: u64, limit: u64 },
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// How to choose and configure the device.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Adapter name substring or index; falls back to `LORAP_ADAPTER`, then the first
    /// discrete/integrated GPU, then anything.
    pub adapter: Option<String>,
    /// Cap on the storage binding size in bytes (never above the adapter's); falls back to
    /// `LORAP_MAX_BINDING`.
    pub max_binding: Option<u64>,
    /// Backends to search; default: WGPU_BACKEND, else all. Tests pin Vulkan so a missing
    /// driver fails loudly instead of falling back to GL.
    pub backends: Option<wgpu::Backends>,
    /// How shader modules are compiled; falls back to `LORAP_SHADER_CHECKS`, then trusted.
    pub shader_checks: Option<ShaderChecks>,
    /// Whether the f16 cooperative-matrix GEMM may run (it does only where the adapter
    /// advertises its configuration); falls back to `LORAP_COOPERATIVE_MATRIX` (`off`), then
    /// yes. The f64-reference tests turn it off: their 1e-4 bounds are f32 bounds.
    pub cooperative_matrix: Option<bool>,
    /// FLOPs one matmul or attention dispatch may do before it is split (0 = never split); default
    /// `DISPATCH_FLOPS` on GPUs and none on CPU drivers (no watchdog there).
    pub max_dispatch_flops: Option<u64>,
}

/// Default FLOP cap of one matmul dispatch on a GPU: 2^37 (0.14 s at 1 TFLOP/s, 0.7 s at
/// 200 GFLOP/s), under the ~2 s after which display GPUs reset a busy device.
pub const DISPATCH_FLOPS: u64 = 1 << 37;

/// One adapter as `gpu-info` shows it.
#[derive(Debug, Clone)]
pub struct AdapterReport {
    pub index: usize,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// Cooperative-matrix (tensor core) configurations the adapter advertises (empty when it
    /// lacks EXPERIMENTAL_COOPERATIVE_MATRIX).
    pub cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// The backends WGPU_BACKEND names, or all of them.
pub fn backends_from_env() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all())
}

/// Every adapter the enabled backends see.
pub fn list_adapters(backends: wgpu::Backends) -> Vec<AdapterReport> {
    let inst = instance(backends);
    let adapters = pollster::block_on(inst.enumerate_adapters(backends));
    adapters
        .into_iter()
        .enumerate()
        .map(|(index, a)| {
            let cooperative_matrix = if a.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) { a.cooperative_matrix_properties() } else { Vec::new() };
            AdapterReport { index, info: a.get_info(), limits: a.limits(), features: a.features(), cooperative_matrix }
        })
        .collect()
}

fn choose_adapter(adapters: Vec<wgpu::Adapter>, wanted: Option<&str>, backends: wgpu::Backends) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        return Err(GpuError::NoAdapter { backends });
    }
    let names = || {
        adapters
            .iter()
            .enumerate()
            .map(|(i, a)| format!("[{i}] {} ({:?})", a.get_info().name, a.get_info().backend))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(w) = wanted {
        let pos = match w.parse::<usize>() {
            Ok(i) if i < adapters.len() => Some(i),
            _ => adapters.iter().position(|a| a.get_info().name.to_lowercase().contains(&w.to_lowercase())),
        };
        return match pos {
            Some(i) => Ok(adapters.into_iter().nth(i).unwrap()),
            None => Err(GpuError::AdapterNotFound { wanted: w.to_string(), available: names() }),
        };
    }
    // Prefer real GPUs, then the CPU (lavapipe) driver; GL last since it lacks f16/subgroups.
    let rank = |a: &wgpu::Adapter| {
        let i = a.get_info();
        let t = match i.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        (i.backend == wgpu::Backend::Gl, t)
    };
    let best = adapters.iter().enumerate().min_by_key(|(_, a)| rank(a)).map(|(i, _)| i).unwrap();
    Ok(adapters.into_iter().nth(best).unwrap())
}

/// Features this crate uses when the adapter has them.
fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY
}

type PoolKey = u64;

#[derive(Default)]
struct PoolInner {
    free: HashMap<PoolKey, Vec<wgpu::Buffer>>,
    /// Released since the releasing thread's last submit: commands it recorded but has not
    /// submitted may still use them, and a `write_buffer` would run before those commands,
    /// so they become reusable only once that thread submits (per thread: a submit by
    /// another thread does not cover this thread's open encoders).
    pending: HashMap<std::thread::ThreadId, Vec<wgpu::Buffer>>,
    /// Bytes of `free` and `pending` buffers.
    idle_bytes: u64,
    /// Bytes of buffers handed out.
    live_bytes: u64,
    /// Bytes of short-lived allocations outside the pool (readback staging).
    transient_bytes: u64,
    /// Bytes of the uniform ring's chunks.
    uniform_bytes: u64,
    /// Largest `total()` seen since the last reset: the one definition of peak memory.
    peak_bytes: u64,
}

impl PoolInner {
    fn total(&self) -> u64 {
        self.live_bytes + self.idle_bytes + self.transient_bytes + self.uniform_bytes
    }
    fn note_peak(&mut self) {
        self.peak_bytes = self.peak_bytes.max(self.total());
    }
    fn trim(&mut self) {
        let freed: u64 = self.free.values().flatten().map(|b| b.size()).sum();
        self.free.clear();
        self.idle_bytes -= freed;
    }
    /// Makes room for `size` new bytes under `budget` (0 = none): idle buffers go first;
    /// what is still held (live, pending a submit, staging) counts in full.
    fn admit(&mut self, size: u64, budget: u64) -> Result<()> {
        // the uniform ring grows while commands are recorded, where nothing can be refused:
        // its usual size is held back from the budget instead
        let held = |p: &PoolInner| p.total() - p.uniform_bytes + p.uniform_bytes.max(UNIFORM_RESERVE);
        if budget > 0 && held(self) + size > budget {
            self.trim();
            if held(self) + size > budget {
                return Err(GpuError::OverBudget { need: size, live: held(self), budget });
            }
        }
        Ok(())
    }
}

/// Reuses storage buffers of identical size: per-layer passes allocate the same shapes
/// over and over. Idle buffers beyond `max_idle_bytes` are released.
pub struct BufferPool {
    inner: Mutex<PoolInner>,
    max_idle_bytes: u64,
}

/// Bytes of a transient allocation, counted until dropped.
pub(crate) struct Transient<'a> {
    pool: &'a BufferPool,
    bytes: u64,
}

impl Drop for Transient<'_> {
    fn drop(&mut self) {
        self.pool.inner.lock().unwrap().transient_bytes -= self.bytes;
    }
}

impl BufferPool {
    fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut p = self.inner.lock().unwrap();
        let b = p.free.get_mut(&size).and_then(|v| v.pop())?;
        p.idle_bytes -= size;
        p.live_bytes += size;
        Some(b)
    }
    /// Counts a new pooled buffer of `size` bytes, if the budget allows it.
    fn admit(&self, size: u64, budget: u64) -> Result<()> {
        let mut p = self.inner.lock().unwrap();
        p.admit(size, budget)?;
        p.live_bytes += size;
        p.note_peak();
        Ok(())
    }
    /// Counts a short-lived allocation of `bytes` outside the pool until the guard drops.
    pub(crate) fn transient(&self, bytes: u64, budget: u64) -> Result<Transient<'_>> {
        let mut p = self.inner.lock().unwrap();
        p.admit(bytes, budget)?;
        p.transient_bytes += bytes;
        p.note_peak();
        Ok(Transient { pool: self, bytes })
    }
    /// Records the bytes of the uniform ring's chunks (small: at most a few MiB).
    fn set_uniform_bytes(&self, bytes: u64) {
        let mut p = self.inner.lock().unwrap();
        if p.uniform_bytes != bytes {
            p.uniform_bytes = bytes;
            p.note_peak();
        }
    }
    fn give(&self, buf: wgpu::Buffer) {
        let size = buf.size();
        let mut p = self.inner.lock().unwrap();
        p.live_bytes -= size;
        p.idle_bytes += size;
        p.pending.entry(std::thread::current().id()).or_default().push(buf);
    }
    /// Called after a submit: buffers released before it may be reused from now on.
    fn submitted(&self) {
        let mut p = self.inner.lock().unwrap();
        let pending = p.pending.remove(&std::thread::current().id()).unwrap_or_default();
        for b in pending {
            if p.idle_bytes > self.max_idle_bytes {
                // dropping (not destroying) lets in-flight commands finish with it
                p.idle_bytes -= b.size();
                continue;
            }
            p.free.entry(b.size()).or_default().push(b);
        }
    }
    /// Releases every idle buffer.
    pub fn trim(&self) {
        self.inner.lock().unwrap().trim();
    }
    fn reset_peak(&self) {
        let mut p = self.inner.lock().unwrap();
        p.peak_bytes = p.total();
    }
}

/// A pooled f32 storage buffer; returns to the pool on drop.
pub struct GpuBuf {
    buf: Option<wgpu::Buffer>,
    /// Length in f32 elements.
    pub len: usize,
    pool: Arc<BufferPool>,
}

impl GpuBuf {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buf.as_ref().unwrap()
    }
    pub fn bytes(&self) -> u64 {
        self.raw().size()
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf({} f32)", self.len)
    }
}

/// The part of a buffer one dispatch binds: an aligned byte window plus the element
/// offset of the first wanted element inside it.
pub struct BindWindow<'a> {
    pub binding: wgpu::BufferBinding<'a>,
    pub inner_offset: u32,
}

/// Identifies one compute pipeline: the WGSL module, the entry point and the values of its
/// pipeline-overridable constants. Every distinct key is compiled once and cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: Shader,
    pub entry: &'static str,
    /// `override` constants by name (bools as 0/1), handed to the compiler as f64.
    pub constants: &'static [(&'static str, u32)],
}

impl PipelineKey {
    /// The key of an entry point without override constants.
    pub const fn new(shader: Shader, entry: &'static str) -> Self {
        PipelineKey { shader, entry, constants: &[] }
    }
}

/// A compiled pipeline with the bind-group layout of its group 0, fetched once.
pub struct Pipeline {
    pub key: PipelineKey,
    pub compute: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

#[derive(Default)]
struct PipelineCache {
    modules: HashMap<Shader, wgpu::ShaderModule>,
    pipelines: HashMap<PipelineKey, Arc<Pipeline>>,
}

/// Bytes of one uniform-ring chunk (256 dispatch slots at the usual 256-byte alignment).
const UNIFORM_CHUNK: u64 = 64 << 10;
/// Idle chunks kept for reuse; more are released.
const UNIFORM_IDLE_CHUNKS: usize = 64;
/// Bytes of uniform chunks the budget keeps free for the ring: a layer's passes use a few
/// chunks (one holds 256 dispatches' parameters); more than this may overshoot the budget
/// by the difference.
const UNIFORM_RESERVE: u64 = 4 * UNIFORM_CHUNK;
/// Encoders tracked at once; past it the ring forgets the others' chunks (which is always
/// safe: a forgotten chunk is never reused, and recorded commands keep it alive).
const UNIFORM_MAX_OPEN: usize = 64;

/// Identity of a command encoder: the bytes its `Hash` writes (wgpu hashes the encoder's
/// id, unique among live encoders), kept exactly so two encoders never share a key.
#[derive(Clone, PartialEq, Eq, Hash)]
struct EncoderKey(Vec<u8>);

impl EncoderKey {
    fn of(enc: &wgpu::CommandEncoder) -> Self {
        struct Bytes(Vec<u8>);
        impl Hasher for Bytes {
            fn write(&mut self, bytes: &[u8]) {
                self.0.extend_from_slice(bytes);
            }
            fn finish(&self) -> u64 {
                0
            }
        }
        let mut h = Bytes(Vec::with_capacity(16));
        enc.hash(&mut h);
        EncoderKey(h.0)
    }
}

/// The chunks one open encoder's dispatches took their uniform slots from.
struct OpenChunks {
    full: Vec<wgpu::Buffer>,
    current: wgpu::Buffer,
    used: u64,
}

/// Uniform parameters of every dispatch live in slots of shared 64 KiB chunks instead of a
/// buffer per dispatch. Each dispatch gets its own slot (offsets aligned to
/// `min_uniform_buffer_offset_alignment`), written with `queue.write_buffer` at record time.
/// A chunk returns to the free list only after the encoder that used it is submitted through
/// `Gpu::submit`: a later write to a reused slot then runs after that submission's commands
/// on the queue, while any slot still named by an unsubmitted encoder is never rewritten
/// (writes are staged until the next submit of any encoder, so reusing those would let a new
/// value overtake the commands that read the old one).
#[derive(Default)]
struct UniformRing {
    free: Vec<wgpu::Buffer>,
    open: HashMap<EncoderKey, OpenChunks>,
    /// Chunks that exist (free, open, or dropped but not yet counted out): GPU memory the
    /// budget and the peak include.
    alive: u64,
}

impl UniformRing {
    fn new_chunk(free: &mut Vec<wgpu::Buffer>, alive: &mut u64, device: &wgpu::Device) -> wgpu::Buffer {
        free.pop().unwrap_or_else(|| {
            *alive += 1;
            // not create_buffer_init: it panics when the device is lost; write_buffer
            // reports through the error handler instead, and `wait` turns that into an error
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params ring"),
                size: UNIFORM_CHUNK,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    /// A fresh slot of `size` bytes for a dispatch recorded into the encoder `key`.
    fn slot(&mut self, device: &wgpu::Device, key: EncoderKey, size: u64, align: u64) -> (wgpu::Buffer, u64) {
        assert!(size <= UNIFORM_CHUNK, "uniform parameters of {size} bytes exceed a ring chunk");
        if !self.open.contains_key(&key) && self.open.len() >= UNIFORM_MAX_OPEN {
            // encoders dropped unsubmitted (error paths) leave entries behind: forget them
            let forgotten: usize = self.open.values().map(|oc| oc.full.len() + 1).sum();
            self.alive -= forgotten as u64;
            self.open.clear();
        }
        let (free, alive) = (&mut self.free, &mut self.alive);
        let oc = self.open.entry(key).or_insert_with(|| OpenChunks { full: Vec::new(), current: Self::new_chunk(free, alive, device), used: 0 });
        if oc.used + size > UNIFORM_CHUNK {
            let next = Self::new_chunk(free, alive, device);
            oc.full.push(std::mem::replace(&mut oc.current, next));
            oc.used = 0;
        }
        let offset = oc.used;
        oc.used = (offset + size).next_multiple_of(align);
        (oc.current.clone(), offset)
    }

    /// The encoder `key` was submitted: its chunks may take new slots from now on.
    fn submitted(&mut self, key: &EncoderKey) {
        if let Some(oc) = self.open.remove(key) {
            for b in oc.full.into_iter().chain([oc.current]) {
                if self.free.len() < UNIFORM_IDLE_CHUNKS {
                    self.free.push(b);
                } else {
                    self.alive -= 1;
                }
            }
        }
    }
}

/// The device, its queue, and the shared caches.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// Effective storage-binding limit in bytes (adapter's, or lower if forced).
    max_binding: u64,
    /// The A B^T matmul kernel for this adapter (`LORAP_NT_KERNEL` read once, at `new`).
    nt_kernel: NtKernel,
    /// Runtime checks compiled into shader modules (`LORAP_SHADER_CHECKS` read once, at `new`).
    shader_checks: ShaderChecks,
    /// FLOPs one matmul or attention dispatch may do (0 = no cap).
    max_dispatch_flops: u64,
    /// The attention kernel for this adapter (`LORAP_ATTENTION_KERNEL` read once, at `new`).
    attn_kernel: AttnKernel,
    /// Whether the compensations' dense products and solves run on this adapter (false:
    /// in f64 on the host; `LORAP_DENSE_SOLVES` read once, at `new`).
    dense_solves_here: bool,
    /// Whether the f16 cooperative-matrix GEMM runs here (adapter configuration and subgroup
    /// width match, `LORAP_COOPERATIVE_MATRIX` not `off`; decided at `new`).
    coop_f16: bool,
    pipelines: Mutex<PipelineCache>,
    uniforms: Mutex<UniformRing>,
    pool: Arc<BufferPool>,
    /// First error the device reported outside our control flow (OOM, validation, loss):
    /// wgpu's default handler would panic, so it is parked here and returned by `wait`.
    device_error: Arc<Mutex<Option<GpuError>>>,
    /// Bytes of storage buffers allowed at once (0 = no budget).
    budget: std::sync::atomic::AtomicU64,
    /// Nanoseconds the host spent blocked on the device (`wait`, and every read): the
    /// host-idle share of a phase, for the per-phase report.
    blocked_nanos: std::sync::atomic::AtomicU64,
    /// Timestamps around every compute pass (adapters with timestamp queries).
    timer: Option<Mutex<PassTimer<EncoderKey>>>,
}

impl Gpu {
    /// Opens the device chosen by `opts` (and the environment), with the adapter's own
    /// limits and the useful features it has.
    pub fn new(opts: &GpuOptions) -> Result<Arc<Gpu>> {
        let backends = opts.backends.unwrap_or_else(backends_from_env);
        let inst = instance(backends);
        let adapters = pollster::block_on(inst.enumerate_adapters(backends));
        let wanted = opts.adapter.clone().or_else(|| std::env::var(ADAPTER_ENV).ok());
        let adapter = choose_adapter(adapters, wanted.as_deref(), backends)?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let mut features = adapter.features() & wanted_features();
        // tensor cores only where the adapter advertises the configuration the shader uses
        let coop_f16 = adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && features.contains(wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP)
            && opts.cooperative_matrix.unwrap_or_else(|| std::env::var(COOP_ENV).as_deref() != Ok("off"))
            && super::kernels::matmul::coop::coop_config_matches(&adapter.cooperative_matrix_properties(), info.subgroup_min_size, info.subgroup_max_size);
        let experimental_features = if coop_f16 {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            // SAFETY: wgpu's experimental features may be unsound or change; only the one
            // cooperative-matrix kernel uses this one, on adapters that list its configuration
            // (LORAP_COOPERATIVE_MATRIX=off opens the device without it).
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("lorap-gpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|source| GpuError::RequestDevice { adapter: info.name.clone(), source })?;
        let device_error: Arc<Mutex<Option<GpuError>>> = Arc::new(Mutex::new(None));
        let sink = device_error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let err = match e {
                wgpu::Error::OutOfMemory { .. } => GpuError::OutOfMemory(e.to_string()),
                other => GpuError::Device(other.to_string()),
            };
            tracing::debug!("{err}");
            let mut slot = sink.lock().unwrap();
            if slot.is_none() {
                *slot = Some(err);
            }
        }));
        let sink = device_error.clone();
        device.set_device_lost_callback(move |reason, msg| {
            // a loss replaces any error it caused: it is the one the user needs to see
            *sink.lock().unwrap() = Some(GpuError::DeviceLost(format!("{reason:?} {msg}").trim().to_string()));
        });
        let env_cap = match std::env::var(MAX_BINDING_ENV) {
            Ok(s) => Some(s.trim().parse::<u64>().map_err(|_| GpuError::BadBindingEnv(s))?),
            Err(_) => None,
        };
        let cap = opts.max_binding.or(env_cap);
        let adapter_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = cap.map_or(adapter_binding, |c| c.min(adapter_binding)).max(256);
        let nt_kernel = std::env::var(NT_KERNEL_ENV).ok().and_then(|s| NtKernel::parse(&s)).unwrap_or_else(|| NtKernel::for_device(info.device_type));
        let attn_kernel = std::env::var(ATTENTION_KERNEL_ENV).ok().and_then(|s| AttnKernel::parse(&s)).unwrap_or_else(|| AttnKernel::for_device(info.device_type));
        let max_dispatch_flops = opts.max_dispatch_flops.unwrap_or(if info.device_type == wgpu::DeviceType::Cpu { 0 } else { DISPATCH_FLOPS });
        let shader_checks = match opts.shader_checks {
            Some(c) => c,
            None => match std::env::var(SHADER_CHECKS_ENV) {
                Ok(s) => ShaderChecks::parse(&s).ok_or(GpuError::BadShaderChecksEnv(s))?,
                Err(_) => ShaderChecks::default(),
            },
        };
        let dense_solves_here = match std::env::var(DENSE_SOLVES_ENV).as_deref().map(str::trim) {
            Ok("gpu") => true,
            Ok("host") => false,
            _ => info.device_type != wgpu::DeviceType::Cpu,
        };
        let timing = features.contains(wgpu::Features::TIMESTAMP_QUERY) && std::env::var(GPU_TIMING_ENV).map_or(true, |v| v.trim() != "off");
        let timer = timing.then(|| Mutex::new(PassTimer::new(queue.get_timestamp_period())));
        tracing::info!(adapter = %info.name, backend = ?info.backend, max_binding, ?nt_kernel, ?attn_kernel, coop_f16, ?shader_checks, timing, "GPU ready");
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            max_binding,
            nt_kernel,
            shader_checks,
            max_dispatch_flops,
            attn_kernel,
            coop_f16,
            dense_solves_here,
            pipelines: Mutex::new(PipelineCache::default()),
            uniforms: Mutex::new(UniformRing::default()),
            pool: Arc::new(BufferPool { inner: Mutex::new(PoolInner::default()), max_idle_bytes: 1 << 30 }),
            device_error,
            budget: std::sync::atomic::AtomicU64::new(0),
            blocked_nanos: std::sync::atomic::AtomicU64::new(0),
            timer,
        }))
    }

    /// The kernel `gemm` runs A B^T products with on this adapter (chosen at `new`).
    pub fn nt_kernel(&self) -> NtKernel {
        self.nt_kernel
    }

    /// The runtime checks this context compiles shader modules with (chosen at `new`).
    pub fn shader_checks(&self) -> ShaderChecks {
        self.shader_checks
    }

    /// Whether the f16 cooperative-matrix GEMM runs on this device (chosen at `new`).
    pub fn coop_f16(&self) -> bool {
        self.coop_f16
    }

    /// The attention kernel `causal_attention` / `cached_attention` run (chosen at `new`).
    pub fn attn_kernel(&self) -> AttnKernel {
        self.attn_kernel
    }

    /// Whether dense products and solves of the compensations belong on this adapter (on a
    /// CPU adapter the host's f64 is exact and faster; `LORAP_DENSE_SOLVES` overrides).
    pub fn dense_solves_here(&self) -> bool {
        self.dense_solves_here
    }

    /// FLOPs one matmul or attention dispatch may do before it is split (0 = no cap).
    pub fn max_dispatch_flops(&self) -> u64 {
        self.max_dispatch_flops
    }

    /// Effective storage binding limit in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// Largest f32 element count one binding may hold, minus the alignment slack that
    /// `window` may need.
    pub fn max_binding_elems(&self) -> usize {
        ((self.max_binding - self.limits.min_storage_buffer_offset_alignment as u64) / 4) as usize
    }

    /// GPU memory this crate holds now and the peak since the last `reset_peak`, in bytes.
    /// Both count everything it allocates: storage buffers in use, pooled idle buffers
    /// (released ones still pending a submit included), readback staging and uniform
    /// chunks; the driver's own allocations (pipelines, descriptor sets) are not known.
    pub fn memory_stats(&self) -> (u64, u64) {
        let p = self.pool.inner.lock().unwrap();
        (p.total(), p.peak_bytes)
    }

    /// Seconds the host has spent blocked on the device since it was opened.
    pub fn blocked_seconds(&self) -> f64 {
        self.blocked_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }

    /// Seconds the GPU spent in compute passes since it was opened, from timestamp
    /// queries (`None` where the adapter has none or `LORAP_GPU_TIMING=off`). Passes whose
    /// timestamps are still on their way back are counted by a later call; with `settle`
    /// the call waits for all submitted work first, so the total is complete.
    pub fn gpu_busy_seconds(&self, settle: bool) -> Option<f64> {
        let timer = self.timer.as_ref()?;
        let poll = if settle { wgpu::PollType::wait_indefinitely() } else { wgpu::PollType::Poll };
        // a failed poll leaves the total as it is: the device error surfaces at the next wait
        let _ = self.device.poll(poll);
        let mut t = timer.lock().unwrap();
        t.collect();
        Some(t.busy_seconds())
    }

    /// Submitted timestamp readbacks not yet counted (tests).
    pub fn timer_in_flight(&self) -> usize {
        self.timer.as_ref().map_or(0, |t| t.lock().unwrap().in_flight())
    }

    /// Drops idle pooled buffers (between phases that use different shapes).
    pub fn trim_pool(&self) {
        self.pool.trim()
    }

    /// Caps the bytes of storage buffers alive at once (0 = no cap); an allocation over it
    /// fails with `GpuError::OverBudget` instead of letting the driver run out.
    pub fn set_budget(&self, bytes: u64) {
        self.budget.store(bytes, std::sync::atomic::Ordering::Relaxed);
        // idle buffers of earlier work would otherwise count against the new budget
        self.pool.trim();
    }

    /// The budget set by `set_budget` (0 = none).
    pub fn budget(&self) -> u64 {
        self.budget.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The device error parked since the last check, if any.
    pub fn take_device_error(&self) -> Option<GpuError> {
        self.device_error.lock().unwrap().take()
    }

    /// Fails if the device reported an error since the last check.
    pub fn check(&self) -> Result<()> {
        match self.take_device_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Starts a new peak-memory measurement from the current footprint (idle pooled
    /// buffers of earlier work released first: they are not the new work's).
    pub fn reset_peak(&self) {
        self.pool.trim();
        self.pool.reset_peak()
    }

    /// A storage buffer of `len` f32, contents undefined (pooled).
    pub fn alloc(&self, len: usize) -> Result<GpuBuf> {
        let size = ((len.max(1) * 4) as u64).next_multiple_of(16);
        if size > self.limits.max_buffer_size {
            return Err(GpuError::BufferTooLarge { bytes: size, limit: self.limits.max_buffer_size });
        }
        let buf = match self.pool.take(size) {
            Some(b) => b,
            None => {
                self.pool.admit(size, self.budget())?;
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }
        };
        Ok(GpuBuf { buf: Some(buf), len, pool: self.pool.clone() })
    }

    /// A buffer of `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<GpuBuf> {
        let b = self.alloc(len)?;
        let mut enc = self.encoder();
        enc.clear_buffer(b.raw(), 0, None);
        self.submit(enc);
        Ok(b)
    }

    /// Uploads f32 data.
    pub fn upload(&self, data: &[f32]) -> Result<GpuBuf> {
        let b = self.alloc(data.len())?;
        self.write(&b, 0, data);
        Ok(b)
    }

    /// Writes f32 data at element offset `at`.
    pub fn write(&self, buf: &GpuBuf, at: usize, data: &[f32]) {
        assert!(at + data.len() <= buf.len, "write past the end of a buffer");
        if !data.is_empty() {
            self.queue.write_buffer(buf.raw(), (at * 4) as u64, bytemuck::cast_slice(data));
        }
    }

    /// Uploads f16 values converted to f32.
    pub fn upload_f16(&self, data: &[half::f16]) -> Result<GpuBuf> {
        self.upload_converted(data.len(), |i| data[i].to_f32())
    }

    /// Uploads bf16 values converted to f32.
    pub fn upload_bf16(&self, data: &[half::bf16]) -> Result<GpuBuf> {
        self.upload_converted(data.len(), |i| data[i].to_f32())
    }

    /// Converts in bounded host chunks so a large weight never needs a full f32 copy on the host.
    fn upload_converted(&self, len: usize, get: impl Fn(usize) -> f32) -> Result<GpuBuf> {
        let b = self.alloc(len)?;
        const CHUNK: usize = 1 << 22;
        let mut tmp = Vec::with_capacity(CHUNK.min(len));
        for start in (0..len).step_by(CHUNK) {
            let end = (start + CHUNK).min(len);
            tmp.clear();
            tmp.extend((start..end).map(&get));
            self.write(&b, start, &tmp);
        }
        Ok(b)
    }

    /// Reads `len` f32 from element offset `at`.
    pub fn read_range(&self, buf: &GpuBuf, at: usize, len: usize) -> Result<Vec<f32>> {
        Ok(self.read_ranges(&[(buf, at, len)])?.pop().unwrap_or_default())
    }

    /// Reads several (buffer, element offset, length) ranges with one submit and one wait:
    /// every read is a full drain of the queue, so a phase that needs several results
    /// fetches them together.
    pub fn read_ranges(&self, ranges: &[(&GpuBuf, usize, usize)]) -> Result<Vec<Vec<f32>>> {
        for &(buf, at, len) in ranges {
            assert!(at + len <= buf.len, "read past the end of a buffer");
        }
        let total: u64 = ranges.iter().map(|r| (r.2 * 4) as u64).sum();
        if total == 0 {
            return Ok(ranges.iter().map(|_| Vec::new()).collect());
        }
        // the staging copy is GPU-visible memory too: it counts against the budget
        let _staging_bytes = self.pool.transient(total, self.budget())?;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.encoder();
        let mut offset = 0u64;
        for &(buf, at, len) in ranges {
            let bytes = (len * 4) as u64;
            if bytes > 0 {
                enc.copy_buffer_to_buffer(buf.raw(), (at * 4) as u64, &staging, offset, bytes);
            }
            offset += bytes;
        }
        self.submit(enc);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| GpuError::Device(e.to_string()))?
            .map_err(|e| GpuError::Device(e.to_string()))?;
        let view = slice.get_mapped_range().map_err(|e| GpuError::Device(e.to_string()))?;
        let all: &[f32] = bytemuck::cast_slice(&view);
        let mut out = Vec::with_capacity(ranges.len());
        let mut first = 0;
        for &(_, _, len) in ranges {
            out.push(all[first..first + len].to_vec());
            first += len;
        }
        drop(view);
        staging.unmap();
        staging.destroy();
        Ok(out)
    }

    /// Reads the whole buffer.
    pub fn read(&self, buf: &GpuBuf) -> Result<Vec<f32>> {
        self.read_range(buf, 0, buf.len)
    }

    /// Reads several whole buffers with one submit and one wait.
    pub fn read_many(&self, bufs: &[&GpuBuf]) -> Result<Vec<Vec<f32>>> {
        let ranges: Vec<(&GpuBuf, usize, usize)> = bufs.iter().map(|&b| (b, 0, b.len)).collect();
        self.read_ranges(&ranges)
    }

    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }

    /// Submits an encoder; buffers released and uniform slots it used become reusable.
    pub fn submit(&self, mut enc: wgpu::CommandEncoder) {
        let key = EncoderKey::of(&enc);
        let timed = self.timer.as_ref().map(|t| t.lock().unwrap().resolve(&key, &mut enc));
        self.queue.submit([enc.finish()]);
        if let (Some(t), Some(slots)) = (&self.timer, timed) {
            t.lock().unwrap().submitted(slots);
        }
        self.pool.submitted();
        // only after the submit: a write staged before it would run ahead of these commands
        let mut ring = self.uniforms.lock().unwrap();
        ring.submitted(&key);
        self.pool.set_uniform_bytes(ring.alive * UNIFORM_CHUNK);
    }

    /// Blocks until all submitted work finished.
    pub fn wait(&self) -> Result<()> {
        let t = std::time::Instant::now();
        let polled = self.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ());
        self.blocked_nanos.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        self.check()?;
        polled.map_err(|e| GpuError::Device(e.to_string()))
    }

    /// The compute pipeline for `key`, compiled (with its shader module) on first use only.
    pub fn pipeline(&self, key: PipelineKey) -> Arc<Pipeline> {
        let mut cache = self.pipelines.lock().unwrap();
        if let Some(p) = cache.pipelines.get(&key) {
            return p.clone();
        }
        let module = cache.modules.entry(key.shader).or_insert_with(|| {
            let desc = wgpu::ShaderModuleDescriptor { label: Some(key.shader.name()), source: wgpu::ShaderSource::Wgsl(key.shader.source().into()) };
            match self.shader_checks {
                ShaderChecks::Checked => self.device.create_shader_module(desc),
                // SAFETY: the modules are this crate's own WGSL (never user input). Each kernel
                // bounds every index it reads or writes by the sizes its wrapper binds (the rooms'
                // exact-guard tests surround operands with NaN sentinels at awkward shapes), and
                // every loop runs to a bound taken from its parameters, so neither the clamps nor
                // the loop counters wgpu would add can change a result.
                ShaderChecks::Trusted => unsafe { self.device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) },
            }
        });
        let constants: Vec<(&str, f64)> = key.constants.iter().map(|&(name, v)| (name, v as f64)).collect();
        let label = format!("{}:{}:{:?}", key.shader.name(), key.entry, key.constants);
        let compute = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        let layout = compute.get_bind_group_layout(0);
        let p = Arc::new(Pipeline { key, compute, layout });
        cache.pipelines.insert(key, p.clone());
        p
    }

    /// Pipelines compiled so far.
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.lock().unwrap().pipelines.len()
    }

    /// Binds elements [first, first+count) of `buf`: the byte offset is aligned down to
    /// the adapter's storage alignment and the remainder returned as `inner_offset`.
    pub fn window<'a>(&self, buf: &'a GpuBuf, first: usize, count: usize) -> BindWindow<'a> {
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        let start = (first as u64 * 4) / align * align;
        let inner = (first as u64 * 4 - start) / 4;
        let end = ((first + count.max(1)) as u64 * 4).min(buf.bytes());
        let size = (end - start).next_multiple_of(4);
        debug_assert!(size <= self.max_binding, "binding window of {size} bytes over the limit");
        BindWindow {
            binding: wgpu::BufferBinding { buffer: buf.raw(), offset: start, size: std::num::NonZeroU64::new(size) },
            inner_offset: inner as u32,
        }
    }

    /// `window` for a shader that reads the binding as an array of vec4: the size rounded up
    /// to whole vec4s (at most 12 bytes more; buffers are allocated in multiples of 16 bytes,
    /// so the rounding stays inside the buffer). Needs a storage offset alignment that is a
    /// multiple of 16, so the binding starts on a vec4.
    pub fn window_vec4<'a>(&self, buf: &'a GpuBuf, first: usize, count: usize) -> BindWindow<'a> {
        debug_assert!(self.limits.min_storage_buffer_offset_alignment.is_multiple_of(16));
        let mut w = self.window(buf, first, count);
        let size = w.binding.size.map_or(0, |s| s.get()).next_multiple_of(16).min(buf.bytes() - w.binding.offset);
        debug_assert!(size <= self.max_binding, "binding window of {size} bytes over the limit");
        w.binding.size = std::num::NonZeroU64::new(size);
        w
    }

    /// Records one dispatch: `params` goes to binding 0 as a uniform (its own slot of the
    /// uniform ring), `storage` to bindings 1.. in order.
    pub fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pipeline: &Pipeline,
        params: &[u8],
        storage: &[wgpu::BufferBinding<'_>],
        groups: (u32, u32, u32),
    ) {
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return;
        }
        let size = (params.len() as u64).next_multiple_of(16).max(16);
        let align = (self.limits.min_uniform_buffer_offset_alignment as u64).max(16);
        // the encoder's identity keys both its uniform chunks and its timestamp queries
        let key = EncoderKey::of(enc);
        let timed = self.timer.as_ref().map(|t| t.lock().unwrap().next_pass(&self.device, key.clone()));
        let (uniform, offset) = {
            let mut ring = self.uniforms.lock().unwrap();
            let slot = ring.slot(&self.device, key, size, align);
            self.pool.set_uniform_bytes(ring.alive * UNIFORM_CHUNK);
            slot
        };
        self.queue.write_buffer(&uniform, offset, params);
        let binding = wgpu::BufferBinding { buffer: &uniform, offset, size: std::num::NonZeroU64::new(size) };
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: wgpu::BindingResource::Buffer(binding) }];
        for (i, b) in storage.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: wgpu::BindingResource::Buffer(b.clone()) });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.layout,
            entries: &entries,
        });
        let timestamp_writes = timed.as_ref().map(|(set, first)| wgpu::ComputePassTimestampWrites { query_set: set, beginning_of_pass_write_index: Some(*first), end_of_pass_write_index: Some(first + 1) });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
        pass.set_pipeline(&pipeline.compute);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }

    /// Splits `n` workgroups into a 2-D grid within the per-dimension limit; shaders
    /// rebuild the linear index as x + y * num_workgroups.x.
    pub fn grid_1d(&self, n: u32) -> (u32, u32, u32) {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if n <= max {
            (n, 1, 1)
        } else {
            (max, n.div_ceil(max), 1)
        }
    }

    /// Row ranges [r0, r1) such that each tensor's rows in one range fit one binding.
    /// `row_elems` lists the elements per row of every tensor the op binds by rows.
    pub fn row_chunks(&self, rows: usize, row_elems: &[usize]) -> Result<Vec<(usize, usize)>> {
        let cap = self.max_binding_elems();
        let widest = row_elems.iter().copied().max().unwrap_or(1).max(1);
        if widest > cap {
            return Err(GpuError::RowTooLarge { row_bytes: widest as u64 * 4, limit: self.max_binding });
        }
        let per = (cap / widest).max(1);
        Ok((0..rows).step_by(per).map(|r0| (r0, (r0 + per).min(rows))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::elementwise::{add_bias, add_bias_ref};
    use crate::gpu::kernels::test_util::{check, gpu, gpu_with_binding, random};

    #[test]
    fn f16_and_bf16_uploads_convert_to_f32() {
        let g = gpu();
        let x = random(1000, 30);
        let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
        let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let gh = g.read(&g.upload_f16(&h).unwrap()).unwrap();
        let gb = g.read(&g.upload_bf16(&b).unwrap()).unwrap();
        assert!(gh.iter().zip(&h).all(|(a, b)| *a == b.to_f32()));
        assert!(gb.iter().zip(&b).all(|(a, b)| *a == b.to_f32()));
    }

    /// Hundreds of dispatches with different parameters share one encoder (several ring
    /// chunks), while other encoders are submitted in between (`zeros`, a second encoder,
    /// a readback): every dispatch must still see its own parameters.
    #[test]
    fn uniform_slots_stay_distinct_across_interleaved_submits() {
        let g = gpu_with_binding(1 << 20);
        let bias = random(13, 1);
        let gbias = g.upload(&bias).unwrap();
        let shape = |i: usize| (1 + i % 7, 1 + i % 13);
        let data: Vec<Vec<f32>> = (0..700).map(|i| random(shape(i).0 * shape(i).1, 100 + i as u64)).collect();
        let bufs: Vec<GpuBuf> = data.iter().map(|d| g.upload(d).unwrap()).collect();
        let mut main = g.encoder();
        let mut side = g.encoder();
        for (i, b) in bufs.iter().enumerate() {
            let (rows, cols) = shape(i);
            // odd ones go to the side encoder, submitted every 50 dispatches
            let enc = if i % 2 == 0 { &mut main } else { &mut side };
            add_bias(&g, enc, b, &gbias, rows, cols).unwrap();
            if i % 50 == 49 {
                g.submit(std::mem::replace(&mut side, g.encoder()));
                let _ = g.zeros(16).unwrap();
            }
            if i == 333 {
                let _ = g.read(&gbias).unwrap();
            }
        }
        g.submit(side);
        g.submit(main);
        for (i, (b, d)) in bufs.iter().zip(&data).enumerate() {
            let (_, cols) = shape(i);
            check(&format!("dispatch {i}"), &g.read(b).unwrap(), &add_bias_ref(d, &bias[..cols], cols));
        }
    }

    /// An encoder dropped unsubmitted (an error path) leaves the ring usable.
    #[test]
    fn dropped_encoders_do_not_break_the_ring() {
        let g = gpu_with_binding(1 << 20);
        let bias = random(5, 2);
        let gbias = g.upload(&bias).unwrap();
        let scratch = g.zeros(5).unwrap();
        for _ in 0..(UNIFORM_MAX_OPEN + 5) {
            let mut enc = g.encoder();
            add_bias(&g, &mut enc, &scratch, &gbias, 1, 5).unwrap();
            drop(enc);
        }
        let x = random(20, 3);
        let gx = g.upload(&x).unwrap();
        let mut enc = g.encoder();
        add_bias(&g, &mut enc, &gx, &gbias, 4, 5).unwrap();
        g.submit(enc);
        check("after dropped encoders", &g.read(&gx).unwrap(), &add_bias_ref(&x, &bias, 5));
        assert!(g.uniforms.lock().unwrap().open.len() <= UNIFORM_MAX_OPEN);
    }

    #[test]
    fn pipelines_compile_once_per_key() {
        let g = gpu_with_binding(1 << 20);
        let k = PipelineKey::new(Shader::Elementwise, "add");
        let a = g.pipeline(k);
        let b = g.pipeline(k);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(g.pipeline_count(), 1);
        g.pipeline(PipelineKey::new(Shader::Elementwise, "silu_mul"));
        assert_eq!(g.pipeline_count(), 2);
    }

    /// The knob: `checked` compiles wgpu's runtime checks in, `trusted` (the default) leaves
    /// them out; on in-bounds kernels both give the same bits (lavapipe shows no speed change:
    /// the checks matter to GPU drivers' loop unrolling).
    #[test]
    fn checked_and_trusted_modules_agree() {
        use crate::gpu::matmul::{gemm_with, GemmCall, GemmOutput, GemmShape, NtKernel, Operand, Scale};
        let mut outs = Vec::new();
        for checks in [ShaderChecks::Checked, ShaderChecks::Trusted] {
            let g = Gpu::new(&GpuOptions { shader_checks: Some(checks), ..crate::gpu::kernels::test_util::options() }).unwrap();
            assert_eq!(g.shader_checks(), checks);
            let (m, k, n) = (67, 45, 131);
            let (a, b) = (g.upload(&random(m * k, 5)).unwrap(), g.upload(&random(n * k, 6)).unwrap());
            let c = g.alloc(m * n).unwrap();
            let mut enc = g.encoder();
            for nt in [NtKernel::Register, NtKernel::Tiled, NtKernel::Vec4] {
                gemm_with(&g, &mut enc, GemmCall { shape: GemmShape { m, n, k }, a: Operand::new(&a, k), b: Operand::new(&b, k).t(), c: GemmOutput::new(&c, n), scale: Scale { alpha: 1.0, beta: 0.5 } }, nt).unwrap();
            }
            g.submit(enc);
            outs.push(g.read(&c).unwrap());
        }
        assert_eq!(outs[0], outs[1]);
        assert_eq!(ShaderChecks::parse("checked"), Some(ShaderChecks::Checked));
        assert_eq!(ShaderChecks::parse("fast"), None);
    }
}

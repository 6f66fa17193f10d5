//! The context: a wgpu device and queue, the adapter's facts, and the pipelines of that
//! device, each compiled on first use.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::kernels::{GemmCandidate, Kernels, TileConfig};

/// How a context picks its GEMM candidates (`ContextOptions::tuning`, or the
/// `MARGIN_SOFTMAX_TUNE` variable: `off`, or a directory for the cache file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Tuning {
    /// Tune each bucket once; the cache file lives in the user's cache directory
    /// (`$XDG_CACHE_HOME`, else `~/.cache`, or `%LOCALAPPDATA%`, under `margin-softmax`).
    #[default]
    Auto,
    /// Tune each bucket once, keeping the cache file in this directory.
    CacheIn(PathBuf),
    /// Tune each bucket once, in memory only (as on wasm, which has no file system).
    InMemory,
    /// Time nothing: every product runs the default candidate.
    Off,
}

impl Tuning {
    /// The tuning the environment asks for, where the options leave it at `Auto`.
    /// On wasm, where there is no clock to time with, tuning is off.
    pub(crate) fn with_env(self) -> Tuning {
        if cfg!(target_arch = "wasm32") {
            return Tuning::Off;
        }
        match (self, std::env::var("MARGIN_SOFTMAX_TUNE").ok().as_deref()) {
            (Tuning::Auto, Some("off")) => Tuning::Off,
            (Tuning::Auto, Some("memory")) => Tuning::InMemory,
            (Tuning::Auto, Some(dir)) if !dir.is_empty() => Tuning::CacheIn(dir.into()),
            (tuning, _) => tuning,
        }
    }
}

/// The default workspace budget: 256 MiB.
pub const DEFAULT_WORKSPACE_BUDGET: u64 = 256 << 20;

/// How to pick the adapter and configure a [`Context`].
#[derive(Debug, Clone, Default)]
pub struct ContextOptions {
    /// Backends to search; `None` honours `WGPU_BACKEND`, else all.
    pub backends: Option<wgpu::Backends>,
    /// Case-insensitive substring of the adapter name; `None` honours `WGPU_ADAPTER_NAME`,
    /// else wgpu's default adapter (`WGPU_POWER_PREF` applies).
    pub adapter_name: Option<String>,
    /// Workgroup shape of the GEMM and the softmax rows.
    pub tiles: TileConfig,
    /// Longest wait for the GPU in the slice API; `None` waits without a bound.
    pub timeout: Option<Duration>,
    /// Bytes of workspace a plan may use to run faster (the chunked algorithm keeps G for
    /// a chunk of rows, or one block of classes); `None` means 256 MiB. The
    /// memory-minimal plan is used where not even one block fits. The f32 shadows of
    /// gradients stored in 16 bits (4·B·D bytes, and 4·C·D or one block's) come on top.
    pub workspace_budget: Option<u64>,
    /// Binds at most this many bytes of one buffer at a time (default: the device's
    /// `max_storage_buffer_binding_size`). Larger class matrices are bound in chunks.
    pub max_binding_bytes: Option<u64>,
    /// The GEMM candidate every product runs, by name (see
    /// [`Context::gemm_candidates`]); `None` honours `MARGIN_SOFTMAX_GEMM`, else the
    /// register-only kernel. Every candidate gives the same bits.
    pub gemm_candidate: Option<String>,
    /// How the GEMM candidates are tuned (see [`Tuning`]); `MARGIN_SOFTMAX_TUNE` (`off`,
    /// `memory` or a directory) applies where this is `Auto`.
    pub tuning: Tuning,
}

/// A device, its queue and the compiled pipelines. Cheap to share: `Send + Sync`.
#[derive(Debug)]
pub struct Context {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    /// The most bytes one storage binding covers: the limit, or less if asked.
    pub(crate) max_binding: u64,
    /// Workspace bytes a plan may use to run faster.
    pub(crate) workspace_budget: u64,
    pub(crate) kernels: Kernels,
    pub(crate) tiles: TileConfig,
    pub(crate) timeout: Option<Duration>,
    pub(crate) lost: Arc<AtomicBool>,
    /// What the modules above keep per context (the slice API's buffers, the shards'
    /// buffers, the tuner's findings), each under its own type.
    caches: Caches,
    /// Bytes of every live buffer the crate allocated on this context.
    allocated: Arc<AtomicU64>,
    /// The GEMM candidate the plans run where nothing is tuned, an index into
    /// `kernels.candidates`.
    pub(crate) gemm_candidate: usize,
    /// Whether `gemm_candidate` was pinned (no tuning then).
    pub(crate) gemm_pinned: bool,
    /// How the GEMM candidates are tuned.
    pub(crate) tuning: Tuning,
    /// 16 bytes bound as the vec4 view of an input region under 16 bytes: then D < 4, no
    /// row holds an aligned vec4, and the view is never read (WebGPU binds at least one
    /// element of an array).
    pub(crate) quad_stand_in: wgpu::Buffer,
    /// One read-only storage binding: where wgpu refuses a recording's bind groups, each
    /// caller region is bound to it alone to name the buffer it refused.
    pub(crate) region_probe: wgpu::BindGroupLayout,
    /// This context's serial number in the process: a plan records only with the context
    /// that made it (devices of different wgpu instances can compare equal).
    pub(crate) serial: u64,
}

/// Per-context state of the modules above the context, one value per type, made on
/// first use: the context holds it without knowing what it is.
#[derive(Default)]
struct Caches(Mutex<HashMap<TypeId, Box<dyn Any + Send>>>);

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Caches")
    }
}

impl Context {
    /// Runs `f` on this context's value of type `T`, made by `make` the first time. The
    /// caches' lock is held while `f` runs: `f` must not reach another cache.
    pub(crate) fn with_cache<T: Any + Send, R>(
        &self,
        make: impl Fn() -> T,
        f: impl FnOnce(&mut T) -> R,
    ) -> R {
        let mut caches = self.caches.0.lock().unwrap_or_else(|e| e.into_inner());
        let value = caches
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(make()));
        match value.downcast_mut::<T>() {
            Some(value) => f(value),
            // Each type is kept under its own TypeId, so the downcast holds.
            None => f(&mut make()),
        }
    }
}

/// A buffer the crate allocated, counted in [`Context::allocated_bytes`] while it lives.
#[derive(Debug)]
pub(crate) struct DeviceBuffer {
    buffer: wgpu::Buffer,
    counter: Arc<AtomicU64>,
}

impl std::ops::Deref for DeviceBuffer {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.buffer.size(), Ordering::SeqCst);
    }
}

/// Parses `vulkan`, `metal`, `dx12`, `gl` (or a comma list of them, as `WGPU_BACKEND` does).
pub fn parse_backends(text: &str) -> Option<wgpu::Backends> {
    let mut backends = wgpu::Backends::empty();
    for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        backends |= match name.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            "webgpu" => wgpu::Backends::BROWSER_WEBGPU,
            _ => return None,
        };
    }
    (!backends.is_empty()).then_some(backends)
}

/// The process's one wgpu instance for `backends`. Contexts share it, so that a buffer of
/// one context's device handed to another is a validation error wgpu reports (and the
/// crate returns as [`Error::BadBuffer`]), not a lookup in another instance's registry,
/// which wgpu cannot tell from one of its own: buffers of an engine's own instance must
/// reach the crate through [`Context::from_device`] on that engine's device.
fn shared_instance(backends: wgpu::Backends) -> wgpu::Instance {
    static INSTANCES: Mutex<Vec<(wgpu::Backends, wgpu::Instance)>> = Mutex::new(Vec::new());
    let mut instances = INSTANCES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, instance)) = instances.iter().find(|(b, _)| *b == backends) {
        return instance.clone();
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle().with_env()
    });
    instances.push((backends, instance.clone()));
    instance
}

/// Contexts are created, and adapters enumerated, one at a time in a process: some
/// drivers race when threads do it at once (Mesa's EGL behind wgpu's GL backend fails
/// with BadAccess, and wgpu-hal unwraps it).
fn creation_lock() -> &'static futures_intrusive::sync::Mutex<()> {
    static LOCK: OnceLock<futures_intrusive::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| futures_intrusive::sync::Mutex::new((), true))
}

/// Every adapter wgpu can see on the given backends (`None`: `WGPU_BACKEND`, else all).
pub async fn enumerate_adapters(backends: Option<wgpu::Backends>) -> Vec<wgpu::Adapter> {
    let _one_at_a_time = creation_lock().lock().await;
    let backends = backends.unwrap_or_else(|| wgpu::Backends::all().with_env());
    shared_instance(backends).enumerate_adapters(backends).await
}

impl Context {
    /// Creates a context on the adapter chosen by `options` and the environment
    /// (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`), requesting the
    /// adapter's own limits.
    pub async fn new(options: ContextOptions) -> Result<Context> {
        let _one_at_a_time = creation_lock().lock().await;
        let backends = options
            .backends
            .unwrap_or_else(|| wgpu::Backends::all().with_env());
        let name = options
            .adapter_name
            .clone()
            .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
            .filter(|n| !n.is_empty());
        let instance = shared_instance(backends);
        let wanted = format!(
            "backends {backends:?}, name containing {:?}",
            name.as_deref().unwrap_or("anything")
        );
        let adapter = match &name {
            Some(name) => {
                let name = name.to_lowercase();
                instance
                    .enumerate_adapters(backends)
                    .await
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&name))
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env().unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .ok(),
        }
        .ok_or(Error::NoAdapter { wanted })?;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("margin-softmax"),
                // Timestamps let the benchmark time the GPU itself; subgroups let the GEMM
                // share loads where they are 8 wide (kernels::shares_lhs).
                required_features: adapter.features()
                    & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device
            .set_device_lost_callback(move |_reason, _message| flag.store(true, Ordering::SeqCst));
        let mut context = Context::from_device(device, queue, options.tiles)?;
        context.info = adapter.get_info();
        context.lost = lost;
        context.timeout = options.timeout;
        if let Some(bytes) = options.workspace_budget {
            context.workspace_budget = bytes;
        }
        if let Some(bytes) = options.max_binding_bytes {
            context.max_binding = context.max_binding.min(bytes.max(1));
        }
        let pinned = options
            .gemm_candidate
            .clone()
            .or_else(|| std::env::var("MARGIN_SOFTMAX_GEMM").ok())
            .filter(|n| !n.is_empty());
        if let Some(name) = pinned {
            context.gemm_candidate = context.pin_gemm_candidate(&name)?;
            context.gemm_pinned = true;
        }
        context.tuning = options.tuning.with_env();
        Ok(context)
    }

    /// Blocking [`Context::new`].
    pub fn new_blocking(options: ContextOptions) -> Result<Context> {
        pollster::block_on(Context::new(options))
    }

    /// Blocking [`Context::new`] with default options.
    pub fn new_default() -> Result<Context> {
        Context::new_blocking(ContextOptions::default())
    }

    /// Wraps a device and queue the caller already has; its pipelines are compiled on it,
    /// each the first time a call runs it.
    /// Sizes are checked against `device.limits()`. The caller keeps the device's lost
    /// callback (wgpu allows one): a lost device surfaces here as [`Error::DeviceLost`]
    /// from the next wait, or as [`Error::Gpu`] from the next call.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        tiles: TileConfig,
    ) -> Result<Context> {
        let limits = device.limits();
        check_tiles(tiles, &limits)?;
        let (kernels, quad_stand_in, region_probe) = device_kernels(&device, tiles)?;
        let info = device.adapter_info();
        Ok(Context {
            max_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
            workspace_budget: DEFAULT_WORKSPACE_BUDGET,
            info: info.clone(),
            device,
            queue,
            limits,
            kernels,
            tiles,
            timeout: None,
            lost: Arc::new(AtomicBool::new(false)),
            caches: Caches::default(),
            allocated: Arc::new(AtomicU64::new(0)),
            gemm_candidate: 0,
            gemm_pinned: false,
            tuning: Tuning::Auto.with_env(),
            quad_stand_in,
            region_probe,
            serial: {
                static SERIALS: AtomicU64 = AtomicU64::new(0);
                SERIALS.fetch_add(1, Ordering::Relaxed)
            },
        })
    }

    /// The GEMM candidates this adapter allows (the first is the default).
    pub fn gemm_candidates(&self) -> &[GemmCandidate] {
        &self.kernels.candidates
    }

    /// The GEMM candidate the plans of this context run.
    pub fn gemm_candidate(&self) -> &GemmCandidate {
        &self.kernels.candidates[self.gemm_candidate]
    }

    /// The index of the candidate named `name`, or [`Error::InvalidParameter`] naming the
    /// candidates there are.
    fn pin_gemm_candidate(&self, name: &str) -> Result<usize> {
        self.kernels
            .candidates
            .iter()
            .position(|c| c.name == name)
            .ok_or(Error::UnknownCandidate {
                name: name.to_string(),
                known: self
                    .kernels
                    .candidates
                    .iter()
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Name, backend, driver and type of the adapter.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits (the adapter's own, for contexts made by [`Context::new`]).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// True when the device can write GPU timestamps (`TIMESTAMP_QUERY`).
    pub fn has_timestamps(&self) -> bool {
        self.device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// The workgroup shape the pipelines were compiled with.
    pub fn tiles(&self) -> TileConfig {
        self.tiles
    }

    /// Bytes of device memory the crate holds on this context right now: every plan's
    /// workspace and the slice API's reusable buffers.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::SeqCst)
    }

    /// Creates a buffer counted in [`Context::allocated_bytes`].
    pub(crate) fn create_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> DeviceBuffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        });
        self.allocated.fetch_add(size, Ordering::SeqCst);
        DeviceBuffer {
            buffer,
            counter: self.allocated.clone(),
        }
    }

    /// Sets the longest wait for the GPU in the slice API (`None`: no bound).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// One line naming the adapter: `name (backend, driver)`.
    pub fn describe(&self) -> String {
        let i = &self.info;
        format!(
            "{} ({:?}, {} {})",
            i.name, i.backend, i.driver, i.driver_info
        )
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            Err(Error::DeviceLost("the device-lost callback fired".into()))
        } else {
            Ok(())
        }
    }

    /// Submits, then waits for the submission, bounded by the context's timeout.
    pub(crate) fn wait(&self, submission: wgpu::SubmissionIndex) -> Result<()> {
        let poll = self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: self.timeout,
        });
        match poll {
            Ok(_) => Ok(()),
            Err(wgpu::PollError::Timeout) => Err(Error::Timeout {
                timeout: self.timeout.unwrap_or_default(),
            }),
            Err(e) => {
                self.lost.store(true, Ordering::SeqCst);
                Err(Error::DeviceLost(e.to_string()))
            }
        }
    }
}

/// [`Error::InvalidParameter`] or [`Error::TooLarge`] unless the tile configuration fits
/// the device: a workgroup of at least one invocation along each axis, within the
/// limits on invocations, on each axis and on workgroup storage.
fn check_tiles(tiles: TileConfig, limits: &wgpu::Limits) -> Result<()> {
    if tiles.rows_per_workgroup == 0 || tiles.classes_per_workgroup == 0 {
        return Err(Error::InvalidParameter {
            name: "tiles",
            value: 0.0,
            requirement: "at least 1 invocation along each axis",
        });
    }
    let invocations = tiles.rows_per_workgroup * tiles.classes_per_workgroup;
    if invocations > limits.max_compute_invocations_per_workgroup {
        return Err(Error::TooLarge {
            what: "tile workgroup invocations",
            size: u64::from(invocations),
            limit: u64::from(limits.max_compute_invocations_per_workgroup),
        });
    }
    let (rows, classes) = (tiles.rows_per_workgroup, tiles.classes_per_workgroup);
    if rows > limits.max_compute_workgroup_size_y || classes > limits.max_compute_workgroup_size_x {
        return Err(Error::TooLarge {
            what: "tile workgroup size along one axis",
            size: u64::from(rows.max(classes)),
            limit: u64::from(
                limits
                    .max_compute_workgroup_size_x
                    .min(limits.max_compute_workgroup_size_y),
            ),
        });
    }
    // The largest workgroup array: the softmax rows' lane partials (28 bytes each).
    let storage = 28 * u64::from(rows) * u64::from(classes);
    if storage > u64::from(limits.max_compute_workgroup_storage_size) {
        return Err(Error::TooLarge {
            what: "workgroup storage of the tile configuration (use smaller tiles)",
            size: storage,
            limit: u64::from(limits.max_compute_workgroup_storage_size),
        });
    }
    Ok(())
}

/// The kernels of `device` (each compiled on first use), the stand-in buffer and the
/// bind group layout that probes buffer regions; [`Error::Gpu`] where the device refuses
/// any of them.
fn device_kernels(
    device: &wgpu::Device,
    tiles: TileConfig,
) -> Result<(Kernels, wgpu::Buffer, wgpu::BindGroupLayout)> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let kernels = Kernels::new(device, tiles);
    let quad_stand_in = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("quad stand-in"),
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let region_probe = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("region probe"),
        entries: &[wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: true },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }],
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(Error::Gpu(e.to_string()));
    }
    Ok((kernels, quad_stand_in, region_probe))
}

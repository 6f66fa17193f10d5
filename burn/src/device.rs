//! The wgpu devices the fused kernels run on: Burn's own device, registered with the
//! crate's [`Context`] on the same `wgpu::Device` and `wgpu::Queue`.
//!
//! CubeCL gives no access to the wgpu device behind a device it brought up itself, so
//! the device is brought up here (as Burn would: [`init_setup`]) or handed in as a
//! [`WgpuSetup`], and its context is kept in a registry that the module looks up by the
//! tensors' device. On a device not in the registry the module runs its composed twin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::wgpu::graphics::AutoGraphicsApi;
use burn::backend::wgpu::{
    try_init_device, try_init_setup, MemoryConfiguration, RuntimeOptions, WgpuDevice, WgpuSetup,
};
use burn::backend::DispatchDevice;
use burn::tensor::Device;
use margin_softmax::{Context, Plan, Shape, TileConfig};

use crate::error::Error;

/// Plans kept per device: a training loop's shapes (its batch, a short last batch, an
/// evaluation batch) stay made; the least recently used beyond these is dropped, with
/// its workspace.
const PLANS_KEPT: usize = 4;

/// A registered device: the crate's context on it and the plans made for it, one per
/// problem shape (each holds its workspace; recordings of one plan run in submit order),
/// the most recently used first.
pub(crate) struct Fused {
    pub context: Context,
    plans: Mutex<Vec<(Shape, Arc<Plan>)>>,
}

impl Fused {
    /// The plan for `shape`, made the first time. A dropped plan's buffers live on in
    /// wgpu until the work already submitted with them is done.
    pub fn plan(&self, shape: Shape) -> Result<Arc<Plan>, Error> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.iter().position(|(s, _)| *s == shape) {
            Some(k) => plans.remove(k).1,
            None => Arc::new(Plan::new(&self.context, shape)?),
        };
        plans.insert(0, (shape, plan.clone()));
        plans.truncate(PLANS_KEPT);
        Ok(plan)
    }
}

fn registry() -> &'static Mutex<HashMap<WgpuDevice, Arc<Fused>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<WgpuDevice, Arc<Fused>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The runtime options of a registered device. One page per allocation: every tensor
/// then has a wgpu buffer of its own, as the kernels need, since WebGPU forbids binding
/// one buffer both read-only (the kernels' inputs) and writable (their outputs) in one
/// dispatch, and CubeCL's default pools carve many tensors from one buffer.
fn runtime_options() -> Result<RuntimeOptions, Error> {
    let mut options = RuntimeOptions::try_default().map_err(|e| Error::Setup(e.to_string()))?;
    options.memory_config = MemoryConfiguration::ExclusivePages;
    Ok(options)
}

fn insert(device: WgpuDevice, setup: &WgpuSetup) -> Result<Device, Error> {
    let context = Context::from_device(
        setup.device.clone(),
        setup.queue.clone(),
        TileConfig::default(),
    )?;
    let fused = Arc::new(Fused {
        context,
        plans: Mutex::default(),
    });
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(device.clone(), fused);
    Ok(burn_device(device))
}

fn burn_device(device: WgpuDevice) -> Device {
    Device::from(DispatchDevice::Cube(cubecl::Device::Wgpu(device)))
}

/// Brings up Burn's default wgpu device (the one `Device::default()` and
/// `Device::wgpu(DeviceKind::DefaultDevice)` name) with the fused kernels on it.
///
/// Call it before anything else uses that device: CubeCL configures a device once, and
/// refuses (an [`Error::Setup`]) once Burn has brought it up on its own. Later calls
/// return the same device.
pub fn wgpu_device() -> Result<Device, Error> {
    let device = WgpuDevice::default();
    if fused_cube(&cubecl::Device::Wgpu(device.clone())).is_some() {
        return Ok(burn_device(device));
    }
    let setup = try_init_setup::<AutoGraphicsApi>(&device, runtime_options()?)
        .map_err(|e| Error::Setup(format!("{e} (call margin_softmax_burn::wgpu_device() before Burn first uses its default wgpu device)")))?;
    insert(device, &setup)
}

/// Registers a wgpu setup the caller made (its device and queue are shared with Burn and
/// with the fused kernels) and returns it as a Burn device. Register each setup once.
pub fn register_setup(setup: WgpuSetup) -> Result<Device, Error> {
    let device = try_init_device(setup.clone(), runtime_options()?)
        .map_err(|e| Error::Setup(e.to_string()))?;
    insert(device, &setup)
}

/// The registered device behind a CubeCL device, if any.
pub(crate) fn fused_cube(device: &cubecl::Device) -> Option<Arc<Fused>> {
    match device {
        cubecl::Device::Wgpu(wgpu) => registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(wgpu)
            .cloned(),
        _ => None,
    }
}

/// The registered device behind a Burn device (with or without autodiff), if any.
pub(crate) fn fused(device: &Device) -> Option<Arc<Fused>> {
    match device.clone().without_autodiff().as_dispatch() {
        DispatchDevice::Cube(cube) => fused_cube(cube),
        _ => None,
    }
}

/// Whether the module runs the fused kernels on `device` (else its composed twin).
pub fn is_fused(device: &Device) -> bool {
    fused(device).is_some()
}

/// Whether `device` (with or without autodiff) is a wgpu device, registered or not.
pub(crate) fn is_wgpu(device: &Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        DispatchDevice::Cube(cubecl::Device::Wgpu(_))
    )
}

//! Adapter discovery and selection: honours `WGPU_BACKEND`, `WGPU_ADAPTER_NAME` and
//! `WGPU_POWER_PREF`; an adapter name that matches nothing is an error, never a panic.

use crate::error::{Error, Result};

/// What `enff info` shows about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// Adapter name (e.g. `NVIDIA H100 80GB HBM3`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Graphics API (Vulkan, Metal, Dx12, Gl).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU (software) or other.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// True for software adapters (lavapipe, llvmpipe, WARP), which `--backend auto` skips.
    pub is_software: bool,
    /// Largest buffer, bytes.
    pub max_buffer_size: u64,
    /// Largest storage-buffer binding, bytes.
    pub max_storage_binding: u64,
    /// Workgroup shared memory, bytes.
    pub max_workgroup_storage: u32,
    /// Storage buffers per shader stage.
    pub max_storage_buffers: u32,
    /// Device-local memory, bytes, where the API reports it (the largest device-local heap
    /// on Vulkan); `None` elsewhere.
    pub device_memory: Option<u64>,
}

impl AdapterSummary {
    pub(crate) fn of(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let limits = adapter.limits();
        AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            is_software: info.device_type == wgpu::DeviceType::Cpu,
            max_buffer_size: limits.max_buffer_size,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            device_memory: device_memory(adapter),
        }
    }

    /// One line for `enff info`.
    pub fn line(&self) -> String {
        format!(
            "{} [{} {}{}] driver {}; max buffer {} MiB, storage binding {} MiB, \
             workgroup storage {} KiB, {} storage buffers/stage",
            self.name,
            self.backend,
            self.device_type,
            if self.is_software { ", software" } else { "" },
            if self.driver.is_empty() {
                "?"
            } else {
                &self.driver
            },
            self.max_buffer_size >> 20,
            self.max_storage_binding >> 20,
            self.max_workgroup_storage >> 10,
            self.max_storage_buffers
        ) + &match self.device_memory {
            Some(b) => format!(", {:.1} GiB device memory", b as f64 / (1u64 << 30) as f64),
            None => String::new(),
        }
    }
}

/// The largest device-local memory heap of a Vulkan adapter, in bytes.
#[cfg(not(target_arch = "wasm32"))]
fn device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    /// `VK_MEMORY_HEAP_DEVICE_LOCAL_BIT`.
    const DEVICE_LOCAL: u32 = 0x1;
    if adapter.get_info().backend != wgpu::Backend::Vulkan {
        return None;
    }
    // SAFETY: the raw handles are only used for a read-only property query while the
    // adapter (and so its instance) is alive; nothing is created or destroyed.
    unsafe {
        let hal = adapter.as_hal::<wgpu::hal::api::Vulkan>()?;
        let props = hal
            .shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device());
        props
            .memory_heaps_as_slice()
            .iter()
            .filter(|h| h.flags.as_raw() & DEVICE_LOCAL != 0)
            .map(|h| h.size)
            .max()
    }
}

#[cfg(target_arch = "wasm32")]
fn device_memory(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

pub(crate) fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    // Where the driver reports a memory budget (Vulkan's memory-budget extension), refuse a
    // buffer that would take more than 95% of it: a clean out-of-memory error instead of
    // paging or a lost device.
    desc.memory_budget_thresholds.for_resource_creation = Some(95);
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu finds with the current environment.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let inst = instance();
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    pollster::block_on(inst.enumerate_adapters(backends))
        .iter()
        .map(AdapterSummary::of)
        .collect()
}

fn rank(t: wgpu::DeviceType, high_performance: bool) -> u32 {
    use wgpu::DeviceType::*;
    match (t, high_performance) {
        (DiscreteGpu, true) | (IntegratedGpu, false) => 0,
        (IntegratedGpu, true) | (DiscreteGpu, false) => 1,
        (VirtualGpu, _) => 2,
        (Other, _) => 3,
        (Cpu, _) => 4,
    }
}

/// Picks an adapter: filtered by `WGPU_ADAPTER_NAME` (case-insensitive substring), software
/// adapters only when `allow_software`, ranked by `WGPU_POWER_PREF` (default: high).
pub(crate) fn choose_adapter(inst: &wgpu::Instance, allow_software: bool) -> Result<wgpu::Adapter> {
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    let all = pollster::block_on(inst.enumerate_adapters(backends));
    let names = || {
        if all.is_empty() {
            "none".to_string()
        } else {
            all.iter()
                .map(|a| {
                    let i = a.get_info();
                    format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
                })
                .collect::<Vec<_>>()
                .join("; ")
        }
    };
    let mut candidates: Vec<wgpu::Adapter> = all.clone();
    if let Ok(want) = std::env::var("WGPU_ADAPTER_NAME") {
        let want_l = want.to_lowercase();
        candidates.retain(|a| a.get_info().name.to_lowercase().contains(&want_l));
        if candidates.is_empty() {
            return Err(Error::Gpu(format!(
                "no adapter matches WGPU_ADAPTER_NAME={want:?}; adapters found: {}",
                names()
            )));
        }
    }
    if !allow_software {
        candidates.retain(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
    }
    let high = !matches!(
        std::env::var("WGPU_POWER_PREF").as_deref(),
        Ok("low") | Ok("LOW") | Ok("Low")
    );
    candidates.sort_by_key(|a| rank(a.get_info().device_type, high));
    candidates.into_iter().next().ok_or_else(|| {
        Error::Gpu(format!(
            "no {}GPU adapter found (WGPU_BACKEND={}); adapters found: {}",
            if allow_software { "" } else { "hardware " },
            std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "all".into()),
            names()
        ))
    })
}

//! The pipeline table of the wgpu backend: every compute kernel of `shaders/` compiled once
//! per device, with its bind-group layout and the order its buffers are bound in.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Uniform,
    Read,
    ReadWrite,
}

pub(super) struct Kernel {
    pub(super) name: &'static str,
    pub(super) pipeline: wgpu::ComputePipeline,
    pub(super) layout: wgpu::BindGroupLayout,
    /// Storage binding numbers in the order buffers are passed to `dispatch`.
    pub(super) bindings: Vec<u32>,
}

pub(super) struct Kernels {
    pub(super) logits: Kernel,
    pub(super) logits_big: Kernel,
    pub(super) logits_reduce: Kernel,
    pub(super) softmax: Kernel,
    pub(super) update: Kernel,
    pub(super) update_tiled: Kernel,
    pub(super) noise: Kernel,
    pub(super) colsum: Kernel,
    pub(super) colsq: Kernel,
    pub(super) inflate: Kernel,
    pub(super) stats_partial: Kernel,
    pub(super) stats_final: Kernel,
    pub(super) finite: Kernel,
    pub(super) observe: Kernel,
    pub(super) obs_sum: Kernel,
    pub(super) obs_sq: Kernel,
    pub(super) obs_final: Kernel,
    pub(super) loglik: Kernel,
    pub(super) model_stage: Kernel,
    pub(super) model_combine: Kernel,
}

impl Kernels {
    pub(super) fn new(device: &wgpu::Device) -> Kernels {
        let module = |label: &str, src: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
        };
        let logits = module(
            "flow_logits",
            include_str!("../../../shaders/flow_logits.wgsl"),
        );
        let softmax = module(
            "softmax",
            include_str!("../../../shaders/flow_softmax.wgsl"),
        );
        let update = module("flow_update", with_observe!("flow_update.wgsl"));
        let noise = module("noise", include_str!("../../../shaders/noise.wgsl"));
        let ens = module("ensemble", with_observe!("ensemble.wgsl"));
        let models = module("models", include_str!("../../../shaders/models.wgsl"));
        use Access::*;
        // Both update entry points read and write the same buffers.
        const UPDATE_BINDINGS: &[(u32, Access)] = &[
            (1, Read),
            (2, Read),
            (3, Read),
            (4, Read),
            (5, ReadWrite),
            (6, Read),
            (7, ReadWrite),
            (8, Read),
            (9, ReadWrite),
        ];
        let k =
            |name: &'static str, m: &wgpu::ShaderModule, entry: &str, binds: &[(u32, Access)]| {
                make_kernel(device, name, m, entry, binds)
            };
        Kernels {
            logits: k(
                "flow_logits",
                &logits,
                "distances",
                &[(1, Read), (2, Read), (3, Read), (4, ReadWrite)],
            ),
            logits_big: k(
                "flow_logits_big",
                &logits,
                "distances_big",
                &[(1, Read), (2, Read), (3, Read), (4, ReadWrite)],
            ),
            logits_reduce: k(
                "flow_logits_reduce",
                &logits,
                "reduce",
                &[(4, ReadWrite), (5, Read), (6, ReadWrite)],
            ),
            softmax: k(
                "softmax_rows",
                &softmax,
                "main",
                &[(1, ReadWrite), (2, ReadWrite)],
            ),
            update: k("flow_update", &update, "main", UPDATE_BINDINGS),
            update_tiled: k("flow_update_tiled", &update, "tiled", UPDATE_BINDINGS),
            noise: k("fill_normal", &noise, "main", &[(1, ReadWrite), (2, Read)]),
            colsum: k("colsum", &ens, "colsum", &[(1, Read), (2, ReadWrite)]),
            colsq: k(
                "colsq",
                &ens,
                "colsq",
                &[(1, Read), (2, ReadWrite), (3, ReadWrite)],
            ),
            inflate: k(
                "inflate",
                &ens,
                "inflate",
                &[(2, ReadWrite), (3, ReadWrite)],
            ),
            stats_partial: k(
                "stats_partial",
                &ens,
                "stats_partial",
                &[(1, Read), (2, ReadWrite), (3, ReadWrite), (5, ReadWrite)],
            ),
            stats_final: k(
                "stats_final",
                &ens,
                "stats_final",
                &[(2, ReadWrite), (5, ReadWrite)],
            ),
            finite: k("check_finite", &ens, "finite", &[(1, Read), (4, ReadWrite)]),
            observe: k("observe", &ens, "observe", &[(1, Read), (2, ReadWrite)]),
            obs_sum: k("obs_sum", &ens, "obs_sum", &[(1, Read), (2, ReadWrite)]),
            obs_sq: k("obs_sq", &ens, "obs_sq", &[(1, Read), (2, ReadWrite)]),
            obs_final: k("obs_final", &ens, "obs_final", &[(2, ReadWrite)]),
            loglik: k(
                "log_likelihoods",
                &ens,
                "loglik",
                &[(1, Read), (2, ReadWrite), (6, Read)],
            ),
            model_stage: k(
                "model_stage",
                &models,
                "stage",
                &[
                    (1, ReadWrite),
                    (2, Read),
                    (3, Read),
                    (4, Read),
                    (5, ReadWrite),
                ],
            ),
            model_combine: k(
                "model_combine",
                &models,
                "combine",
                &[
                    (1, ReadWrite),
                    (2, Read),
                    (3, Read),
                    (4, Read),
                    (5, ReadWrite),
                ],
            ),
        }
    }
}

pub(super) fn make_kernel(
    device: &wgpu::Device,
    name: &'static str,
    module: &wgpu::ShaderModule,
    entry: &str,
    binds: &[(u32, Access)],
) -> Kernel {
    let mut entries = vec![wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: wgpu::BufferSize::new(PARAM_SLOT),
        },
        count: None,
    }];
    for &(b, access) in binds {
        debug_assert!(access != Access::Uniform);
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: b,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: access == Access::Read,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    }
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(name),
        entries: &entries,
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(name),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: Some(&pl),
        module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    });
    Kernel {
        name,
        pipeline,
        layout,
        bindings: binds.iter().map(|b| b.0).collect(),
    }
}

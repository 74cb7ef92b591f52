//! The table of WGSL kernels and the pipeline cache: every pipeline is compiled once per (kernel,
//! threads per row) and kept for the life of the backend.
//!
//! A kernel is a [`WgslKernel`] constant declared beside its shader in the op's folder
//! (`src/ops/<family>/wgpu.rs`): its file, source, entry point and bindings. [`KERNELS`] lists
//! them all, for [`super::WgpuBackend::warm_up`] and the shader tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::ops;

/// `common.wgsl`, prepended to every shader (numerics shared by the kernels).
pub const COMMON_WGSL: &str = include_str!("common.wgsl");
/// `row_io.wgsl`, prepended to the row losses after `common.wgsl` (the row-loss bindings and the
/// online softmax statistics).
pub const ROW_IO_WGSL: &str = include_str!("row_io.wgsl");

/// How a binding is used: the uniform parameters, a read-only or a read-write storage buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    Uniform,
    Read,
    ReadWrite,
}

/// The bindings of every row loss (`row_io.wgsl`).
pub(crate) const ROW_LOSS_BINDINGS: &[Bind] = &[
    Bind::Uniform,   // params
    Bind::ReadWrite, // student (read_write for the in-place gradient)
    Bind::ReadWrite, // teacher (read only; read_write as the shader declares it, row_io.wgsl)
    Bind::ReadWrite, // labels (the same)
    Bind::Read,      // valid count
    Bind::ReadWrite, // row_loss
    Bind::ReadWrite, // grad_student
    Bind::ReadWrite, // grad_teacher
];

/// The row-loss bindings and a sparse teacher's `[N, k]` indices (`sparse.wgsl`).
pub(crate) const SPARSE_BINDINGS: &[Bind] = &[
    Bind::Uniform,
    Bind::ReadWrite,
    Bind::ReadWrite,
    Bind::ReadWrite,
    Bind::Read,
    Bind::ReadWrite,
    Bind::ReadWrite,
    Bind::ReadWrite,
    Bind::Read, // indices
];

/// One compute entry point of one WGSL file.
#[derive(Debug)]
pub struct WgslKernel {
    /// The shader's file name (for messages and the tests).
    pub file: &'static str,
    /// The file's text (without the preludes).
    pub body: &'static str,
    /// The `@compute` function.
    pub entry: &'static str,
    /// Whether `row_io.wgsl` is prepended (the row losses).
    pub row_io: bool,
    /// Binding 0 is the uniform; then one per buffer, in the shader's order.
    pub bindings: &'static [Bind],
}

impl WgslKernel {
    /// The full source: `common.wgsl`, `row_io.wgsl` for the row losses, then the file.
    pub fn source(&self) -> String {
        let mut src =
            String::with_capacity(COMMON_WGSL.len() + ROW_IO_WGSL.len() + self.body.len());
        src.push_str(COMMON_WGSL);
        if self.row_io {
            src.push_str(ROW_IO_WGSL);
        }
        src.push_str(self.body);
        src
    }
}

/// The valid-row count and the fixed-order reduction of the row losses (`reduce.wgsl`).
pub(crate) const REDUCE_WGSL: &str = include_str!("reduce.wgsl");
const REDUCE_BINDINGS: &[Bind] = &[
    Bind::Uniform,
    Bind::Read,
    Bind::ReadWrite,
    Bind::Read,
    Bind::ReadWrite,
];
pub(crate) const COUNT_VALID: WgslKernel = WgslKernel {
    file: "reduce.wgsl",
    body: REDUCE_WGSL,
    entry: "count_valid",
    row_io: false,
    bindings: REDUCE_BINDINGS,
};
pub(crate) const REDUCE_ROWS: WgslKernel = WgslKernel {
    file: "reduce.wgsl",
    body: REDUCE_WGSL,
    entry: "reduce_rows",
    row_io: false,
    bindings: REDUCE_BINDINGS,
};

/// Rounding an f32 gradient to bf16 / f16 and packing it (`pack.wgsl`).
pub(crate) const PACK_HALF: WgslKernel = WgslKernel {
    file: "pack.wgsl",
    body: include_str!("pack.wgsl"),
    entry: "pack_half",
    row_io: false,
    bindings: &[Bind::Uniform, Bind::Read, Bind::ReadWrite],
};

/// Every kernel of the backend, one line each.
pub const KERNELS: &[&WgslKernel] = &[
    &COUNT_VALID,
    &REDUCE_ROWS,
    &PACK_HALF,
    &ops::softmax::wgpu::FORWARD,
    &ops::softmax::wgpu::BACKWARD,
    &ops::divergence::wgpu::DIVERGENCE,
    &ops::cross_entropy::wgpu::CROSS_ENTROPY,
    &ops::hinton::wgpu::HINTON,
    &ops::dkd::wgpu::DKD,
    &ops::sparse::wgpu::SPARSE,
    &ops::sharded::wgpu::STATS_KERNEL,
    &ops::sharded::wgpu::JSD_KERNEL,
    &ops::sharded::wgpu::LOSS_KERNEL,
    &ops::feature::wgpu::MSE,
    &ops::feature::wgpu::ATTENTION,
    &ops::dense::wgpu::MATMUL,
    &ops::dense::wgpu::BIAS_ADD,
    &ops::dense::wgpu::SUM_ROWS,
    &ops::dense::wgpu::RELU,
    &ops::dense::wgpu::RELU_BACKWARD,
    &ops::dense::wgpu::AXPY,
    &ops::dense::wgpu::COPY_ROWS,
    &ops::optim::wgpu::ADAM,
    &ops::optim::wgpu::SGD,
    &ops::conv::wgpu::IM2COL,
    &ops::conv::wgpu::COL2IM,
    &ops::conv::wgpu::POOL,
    &ops::conv::wgpu::POOL_BACKWARD,
    &ops::conv::wgpu::TRANSPOSE,
    &ops::relational::wgpu::ROW_NORMALIZE,
    &ops::relational::wgpu::ROW_NORMALIZE_BACKWARD,
    &ops::relational::wgpu::PAIRWISE_DISTANCE,
    &ops::relational::wgpu::PAIRWISE_DISTANCE_BACKWARD,
    &ops::relational::wgpu::OFFDIAG_NORMALIZE,
    &ops::relational::wgpu::OFFDIAG_NORMALIZE_BACKWARD,
];

/// A compiled pipeline and the layout its bind groups are made with.
pub struct Compiled {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// The cache key of a kernel: its file and entry point.
type Key = (&'static str, &'static str);

/// Pipelines by (kernel, threads per row); modules by file.
#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<(Key, u32), Arc<Compiled>>>,
}

impl PipelineCache {
    pub fn get(&self, device: &wgpu::Device, kernel: &WgslKernel, tpr: u32) -> Arc<Compiled> {
        let key = ((kernel.file, kernel.entry), tpr);
        if let Some(c) = self.pipelines.lock().unwrap().get(&key) {
            return c.clone();
        }
        let module = self
            .modules
            .lock()
            .unwrap()
            .entry(kernel.file)
            .or_insert_with(|| {
                Arc::new(device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.file),
                    source: wgpu::ShaderSource::Wgsl(kernel.source().into()),
                }))
            })
            .clone();
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b {
                        Bind::Uniform => wgpu::BufferBindingType::Uniform,
                        Bind::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Bind::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(kernel.entry),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(kernel.entry),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants = [("TPR", tpr as f64)];
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.entry),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every shader writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let compiled = Arc::new(Compiled { pipeline, layout });
        self.pipelines.lock().unwrap().insert(key, compiled.clone());
        compiled
    }
}

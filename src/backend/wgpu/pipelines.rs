//! The WGSL sources, their bind-group layouts, and the pipeline cache: every pipeline is compiled
//! once per (kernel, threads-per-row) and kept for the life of the backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Shader sources, embedded at build time. `common.wgsl` is prepended to every shader and
/// `row_io.wgsl` to the row losses.
pub const COMMON_WGSL: &str = include_str!("../../../shaders/common.wgsl");
pub const ROW_IO_WGSL: &str = include_str!("../../../shaders/row_io.wgsl");
pub const SOFTMAX_WGSL: &str = include_str!("../../../shaders/softmax.wgsl");
pub const DIVERGENCE_WGSL: &str = include_str!("../../../shaders/divergence.wgsl");
pub const CROSS_ENTROPY_WGSL: &str = include_str!("../../../shaders/cross_entropy.wgsl");
pub const HINTON_WGSL: &str = include_str!("../../../shaders/hinton.wgsl");
pub const REDUCE_WGSL: &str = include_str!("../../../shaders/reduce.wgsl");
pub const MSE_WGSL: &str = include_str!("../../../shaders/mse.wgsl");
pub const ATTENTION_WGSL: &str = include_str!("../../../shaders/attention.wgsl");
pub const DENSE_WGSL: &str = include_str!("../../../shaders/dense.wgsl");
pub const OPTIM_WGSL: &str = include_str!("../../../shaders/optim.wgsl");
pub const CONV_WGSL: &str = include_str!("../../../shaders/conv.wgsl");
pub const RELATIONAL_WGSL: &str = include_str!("../../../shaders/relational.wgsl");

/// One entry point of one shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    SoftmaxForward,
    SoftmaxBackward,
    Divergence,
    CrossEntropy,
    Hinton,
    CountValid,
    ReduceRows,
    Mse,
    Attention,
    Matmul,
    BiasAdd,
    SumRows,
    Relu,
    ReluBackward,
    Axpy,
    Adam,
    Sgd,
    Im2col,
    Col2im,
    Pool,
    PoolBackward,
    Transpose,
    RowNormalize,
    RowNormalizeBackward,
    PairwiseDistance,
    PairwiseDistanceBackward,
    OffdiagNormalize,
    OffdiagNormalizeBackward,
}

/// How a binding is used: the uniform parameters, a read-only or a read-write storage buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    Uniform,
    Read,
    ReadWrite,
}

use Bind::{Read, ReadWrite, Uniform};

const ROW_LOSS_BINDINGS: &[Bind] = &[
    Uniform,   // params
    ReadWrite, // student (read_write for the in-place gradient)
    Read,      // teacher
    Read,      // labels
    Read,      // valid count
    ReadWrite, // row_loss
    ReadWrite, // grad_student
    ReadWrite, // grad_teacher
];

impl Kernel {
    pub const ALL: [Kernel; 28] = [
        Kernel::SoftmaxForward,
        Kernel::SoftmaxBackward,
        Kernel::Divergence,
        Kernel::CrossEntropy,
        Kernel::Hinton,
        Kernel::CountValid,
        Kernel::ReduceRows,
        Kernel::Mse,
        Kernel::Attention,
        Kernel::Matmul,
        Kernel::BiasAdd,
        Kernel::SumRows,
        Kernel::Relu,
        Kernel::ReluBackward,
        Kernel::Axpy,
        Kernel::Adam,
        Kernel::Sgd,
        Kernel::Im2col,
        Kernel::Col2im,
        Kernel::Pool,
        Kernel::PoolBackward,
        Kernel::Transpose,
        Kernel::RowNormalize,
        Kernel::RowNormalizeBackward,
        Kernel::PairwiseDistance,
        Kernel::PairwiseDistanceBackward,
        Kernel::OffdiagNormalize,
        Kernel::OffdiagNormalizeBackward,
    ];

    /// The shader's file name (for messages) and full source (preludes included).
    pub fn source(self) -> (&'static str, String) {
        let (name, body, row_io) = match self {
            Kernel::SoftmaxForward | Kernel::SoftmaxBackward => {
                ("softmax.wgsl", SOFTMAX_WGSL, false)
            }
            Kernel::Divergence => ("divergence.wgsl", DIVERGENCE_WGSL, true),
            Kernel::CrossEntropy => ("cross_entropy.wgsl", CROSS_ENTROPY_WGSL, true),
            Kernel::Hinton => ("hinton.wgsl", HINTON_WGSL, true),
            Kernel::CountValid | Kernel::ReduceRows => ("reduce.wgsl", REDUCE_WGSL, false),
            Kernel::Mse => ("mse.wgsl", MSE_WGSL, false),
            Kernel::Attention => ("attention.wgsl", ATTENTION_WGSL, false),
            Kernel::Matmul
            | Kernel::BiasAdd
            | Kernel::SumRows
            | Kernel::Relu
            | Kernel::ReluBackward
            | Kernel::Axpy => ("dense.wgsl", DENSE_WGSL, false),
            Kernel::Adam | Kernel::Sgd => ("optim.wgsl", OPTIM_WGSL, false),
            Kernel::Im2col
            | Kernel::Col2im
            | Kernel::Pool
            | Kernel::PoolBackward
            | Kernel::Transpose => ("conv.wgsl", CONV_WGSL, false),
            Kernel::RowNormalize
            | Kernel::RowNormalizeBackward
            | Kernel::PairwiseDistance
            | Kernel::PairwiseDistanceBackward
            | Kernel::OffdiagNormalize
            | Kernel::OffdiagNormalizeBackward => ("relational.wgsl", RELATIONAL_WGSL, false),
        };
        let mut src = String::with_capacity(COMMON_WGSL.len() + ROW_IO_WGSL.len() + body.len());
        src.push_str(COMMON_WGSL);
        if row_io {
            src.push_str(ROW_IO_WGSL);
        }
        src.push_str(body);
        (name, src)
    }

    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::SoftmaxForward => "forward",
            Kernel::SoftmaxBackward => "backward",
            Kernel::CountValid => "count_valid",
            Kernel::ReduceRows => "reduce_rows",
            Kernel::Matmul => "matmul",
            Kernel::BiasAdd => "bias_add",
            Kernel::SumRows => "sum_rows",
            Kernel::Relu => "relu",
            Kernel::ReluBackward => "relu_backward",
            Kernel::Axpy => "axpy",
            Kernel::Adam => "adam",
            Kernel::Sgd => "sgd",
            Kernel::Im2col => "im2col",
            Kernel::Col2im => "col2im",
            Kernel::Pool => "pool",
            Kernel::PoolBackward => "pool_backward",
            Kernel::Transpose => "transpose",
            Kernel::RowNormalize => "row_normalize",
            Kernel::RowNormalizeBackward => "row_normalize_backward",
            Kernel::PairwiseDistance => "pairwise_distance",
            Kernel::PairwiseDistanceBackward => "pairwise_distance_backward",
            Kernel::OffdiagNormalize => "offdiag_normalize",
            Kernel::OffdiagNormalizeBackward => "offdiag_normalize_backward",
            _ => "main",
        }
    }

    pub fn bindings(self) -> &'static [Bind] {
        match self {
            Kernel::SoftmaxForward | Kernel::SoftmaxBackward => &[Uniform, Read, Read, ReadWrite],
            Kernel::Divergence | Kernel::CrossEntropy | Kernel::Hinton => ROW_LOSS_BINDINGS,
            Kernel::CountValid | Kernel::ReduceRows => &[Uniform, Read, ReadWrite, Read, ReadWrite],
            Kernel::Mse => &[Uniform, Read, Read, ReadWrite, ReadWrite, ReadWrite],
            Kernel::Attention => &[Uniform, Read, Read, ReadWrite, ReadWrite, ReadWrite],
            Kernel::Matmul
            | Kernel::BiasAdd
            | Kernel::SumRows
            | Kernel::Relu
            | Kernel::ReluBackward
            | Kernel::Axpy => &[Uniform, Read, Read, ReadWrite],
            Kernel::Adam | Kernel::Sgd => &[Uniform, Read, ReadWrite, ReadWrite, ReadWrite],
            Kernel::Im2col
            | Kernel::Col2im
            | Kernel::Pool
            | Kernel::PoolBackward
            | Kernel::Transpose => &[Uniform, Read, Read, ReadWrite],
            Kernel::RowNormalize
            | Kernel::RowNormalizeBackward
            | Kernel::PairwiseDistance
            | Kernel::PairwiseDistanceBackward
            | Kernel::OffdiagNormalize
            | Kernel::OffdiagNormalizeBackward => &[Uniform, Read, Read, Read, ReadWrite],
        }
    }
}

/// A compiled pipeline and the layout its bind groups are made with.
pub struct Compiled {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// Pipelines by (kernel, threads per row); modules by kernel.
#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<Kernel, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<(Kernel, u32), Arc<Compiled>>>,
}

impl PipelineCache {
    pub fn get(&self, device: &wgpu::Device, kernel: Kernel, tpr: u32) -> Arc<Compiled> {
        if let Some(c) = self.pipelines.lock().unwrap().get(&(kernel, tpr)) {
            return c.clone();
        }
        let module = {
            let mut modules = self.modules.lock().unwrap();
            modules
                .entry(kernel)
                .or_insert_with(|| {
                    let (name, src) = kernel.source();
                    Arc::new(device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(name),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    }))
                })
                .clone()
        };
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings()
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
            label: Some(kernel.entry_point()),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(kernel.entry_point()),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants = [("TPR", tpr as f64)];
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.entry_point()),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(kernel.entry_point()),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every shader writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let compiled = Arc::new(Compiled { pipeline, layout });
        self.pipelines
            .lock()
            .unwrap()
            .insert((kernel, tpr), compiled.clone());
        compiled
    }
}

//! A candle trainer that distils with our loss: a candle MLP teacher (64-256-10) trained with
//! candle's cross-entropy and AdamW on the digits set, then a small student (64-16-10) trained
//! with `distillation::candle::kd_loss` in its step, beside the same student trained alone.
//!
//! ```text
//! cargo run --release --features candle --example candle_distil
//! ```

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use distillation::data::Dataset;

struct Mlp {
    hidden: Linear,
    out: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, dim: usize, width: usize, classes: usize) -> candle_core::Result<Self> {
        Ok(Mlp {
            hidden: linear(dim, width, vb.pp("hidden"))?,
            out: linear(width, classes, vb.pp("out"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.out.forward(&self.hidden.forward(x)?.relu()?)
    }
}

fn accuracy(model: &Mlp, x: &Tensor, y: &Tensor) -> candle_core::Result<f32> {
    let pred = model.forward(x)?.argmax(D::Minus1)?;
    let right = pred
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(right / y.dims()[0] as f32)
}

/// Trains `model` for `epochs` over mini-batches of 64 with `loss(logits, rows)`.
fn train(
    vars: &VarMap,
    model: &Mlp,
    x: &Tensor,
    epochs: usize,
    loss: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let n = x.dims()[0];
    for _ in 0..epochs {
        for start in (0..n).step_by(64) {
            let len = 64.min(n - start);
            let rows = Tensor::arange(start as u32, (start + len) as u32, x.device())?;
            let logits = model.forward(&x.narrow(0, start, len)?)?;
            opt.backward_step(&loss(&logits, &rows)?)?;
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let data = Dataset::digits()?;
    let n = data.y.len();
    let split = n * 4 / 5; // the first 80% train, the rest test
    let x = Tensor::from_vec(data.x.clone(), (n, data.dim), &dev)?;
    let y = Tensor::from_vec(
        data.y.iter().map(|&v| v as u32).collect::<Vec<_>>(),
        n,
        &dev,
    )?;
    let (x_train, y_train) = (x.narrow(0, 0, split)?, y.narrow(0, 0, split)?);
    let (x_test, y_test) = (
        x.narrow(0, split, n - split)?,
        y.narrow(0, split, n - split)?,
    );

    let teacher_vars = VarMap::new();
    let teacher = Mlp::new(
        VarBuilder::from_varmap(&teacher_vars, DType::F32, &dev),
        data.dim,
        256,
        data.classes,
    )?;
    train(&teacher_vars, &teacher, &x_train, 30, |logits, rows| {
        candle_nn::loss::cross_entropy(logits, &y_train.index_select(rows, 0)?)
    })?;
    // The teacher's logits once, detached: the soft targets.
    let soft = teacher.forward(&x_train)?.detach();

    let run_student = |distil: bool| -> candle_core::Result<f32> {
        let vars = VarMap::new();
        let student = Mlp::new(
            VarBuilder::from_varmap(&vars, DType::F32, &dev),
            data.dim,
            16,
            data.classes,
        )?;
        train(&vars, &student, &x_train, 30, |logits, rows| {
            let labels = y_train.index_select(rows, 0)?;
            if distil {
                let t = soft.index_select(rows, 0)?;
                distillation::candle::kd_loss(logits, &t, &labels, 4.0, 0.2)
            } else {
                candle_nn::loss::cross_entropy(logits, &labels)
            }
        })?;
        accuracy(&student, &x_test, &y_test)
    };
    let t_acc = accuracy(&teacher, &x_test, &y_test)?;
    let d_acc = run_student(true)?;
    let s_acc = run_student(false)?;
    println!(
        "teacher (64-256-10, candle CE)            {:.2}%",
        100.0 * t_acc
    );
    println!(
        "student (64-16-10, our kd_loss, T 4, a 0.2) {:.2}%",
        100.0 * d_acc
    );
    println!(
        "student alone (64-16-10, candle CE)       {:.2}%",
        100.0 * s_acc
    );
    Ok(())
}

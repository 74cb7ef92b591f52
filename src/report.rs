//! Outputs of a run: the training curves as an SVG plot, and the student saved as safetensors with
//! the names and layouts PyTorch's `nn.Sequential(Linear, ReLU, Linear, ...)` loads.

use std::collections::HashMap;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::experiment::Report;
use crate::nn::{Cnn, Mlp, Net};

/// Mean training loss per epoch: one panel each for the teacher (cross-entropy; empty for a
/// loaded teacher), the distilled student (its objective `alpha CE + (1 - alpha) T^2 KL`) and the
/// simple model (cross-entropy), each on its own scale, one line per fold.
pub fn curves_svg(r: &Report) -> String {
    let panels: [(&str, &str, Vec<&Vec<f64>>); 3] = [
        (
            if r.config.teacher.is_some() {
                "teacher: loaded, not trained"
            } else {
                "teacher: cross-entropy"
            },
            "#1f77b4",
            r.folds.iter().map(|f| &f.teacher_curve).collect(),
        ),
        (
            "distilled: a CE + (1-a) T\u{b2} KL",
            "#d62728",
            r.folds.iter().map(|f| &f.student_curve).collect(),
        ),
        (
            "simple: cross-entropy",
            "#2ca02c",
            r.folds.iter().map(|f| &f.simple_curve).collect(),
        ),
    ];
    let (pw, h, pad) = (300.0, 300.0, 45.0);
    let w = pw * panels.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">training loss per epoch, one line per fold (T = {}, alpha = {})</text>\n",
        h + 20.0,
        w / 2.0,
        r.config.temperature,
        r.config.alpha
    );
    for (k, (title, color, curves)) in panels.iter().enumerate() {
        let x0 = k as f64 * pw;
        let (left, right, top, bottom) = (x0 + pad, x0 + pw - 10.0, 45.0, h - 15.0);
        let max_y = curves
            .iter()
            .flat_map(|c| c.iter())
            .copied()
            .filter(|v| v.is_finite())
            .fold(1e-9, f64::max);
        let epochs = curves.iter().map(|c| c.len()).max().unwrap_or(1).max(1);
        out += &format!(
            "<text x=\"{}\" y=\"36\" text-anchor=\"middle\" font-size=\"12\">{title}</text>\n\
             <line x1=\"{left}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
             <text x=\"{right}\" y=\"{}\" text-anchor=\"end\">epoch {epochs}</text>\n",
            (left + right) / 2.0,
            bottom + 13.0
        );
        for t in 0..=4 {
            let v = max_y * t as f64 / 4.0;
            let y = bottom - (bottom - top) * t as f64 / 4.0;
            out += &format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
                left - 4.0,
                y + 4.0
            );
        }
        for c in curves {
            let pts: Vec<String> = c
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| {
                    let x = left + (right - left) * (i as f64 + 1.0) / epochs as f64;
                    let y = bottom - (bottom - top) * (v / max_y).min(1.0);
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            out += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.2\" points=\"{}\"/>\n",
                pts.join(" ")
            );
        }
    }
    out + "</svg>\n"
}

/// A tensor to save: name, PyTorch shape, f32 data in PyTorch's layout.
type Named = (String, Vec<usize>, Vec<f32>);

/// `[in, out]` (ours) to `[out, in]` (PyTorch's `nn.Linear`).
fn linear_weight(w: &[f32], inp: usize, out: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..inp {
        for c in 0..out {
            t[c * inp + r] = w[r * out + c];
        }
    }
    t
}

fn mlp_tensors<B: Backend>(mlp: &Mlp<B>, backend: &B) -> Result<Vec<Named>> {
    let mut v = Vec::new();
    for (i, layer) in mlp.layers.iter().enumerate() {
        let (inp, out) = (layer.inputs(), layer.outputs());
        v.push((
            format!("{}.weight", 2 * i),
            vec![out, inp],
            linear_weight(&layer.weight.value.to_host(backend)?, inp, out),
        ));
        v.push((
            format!("{}.bias", 2 * i),
            vec![out],
            layer.bias.value.to_host(backend)?,
        ));
    }
    Ok(v)
}

/// CNN keys `convs.{i}.weight` `[C_out, C_in, K, K]` (PyTorch's `nn.Conv2d` layout; ours is
/// `[(ky, kx, C_in), C_out]`), `convs.{i}.bias`, `head.weight` `[out, in]`, `head.bias`. The head's
/// inputs are our channels-last flattening `(h, w, c)` of the last block.
fn cnn_tensors<B: Backend>(cnn: &Cnn<B>, backend: &B) -> Result<Vec<Named>> {
    let mut v = Vec::new();
    for (i, conv) in cnn.convs.iter().enumerate() {
        let (cin, cout, k) = (conv.in_channels(), conv.out_channels(), conv.k);
        let w = conv.weight.value.to_host(backend)?;
        let mut t = vec![0f32; w.len()];
        for ky in 0..k {
            for kx in 0..k {
                for ci in 0..cin {
                    for co in 0..cout {
                        t[((co * cin + ci) * k + ky) * k + kx] =
                            w[((ky * k + kx) * cin + ci) * cout + co];
                    }
                }
            }
        }
        v.push((format!("convs.{i}.weight"), vec![cout, cin, k, k], t));
        v.push((
            format!("convs.{i}.bias"),
            vec![cout],
            conv.bias.value.to_host(backend)?,
        ));
    }
    let (inp, out) = (cnn.head.inputs(), cnn.head.outputs());
    v.push((
        "head.weight".into(),
        vec![out, inp],
        linear_weight(&cnn.head.weight.value.to_host(backend)?, inp, out),
    ));
    v.push((
        "head.bias".into(),
        vec![out],
        cnn.head.bias.value.to_host(backend)?,
    ));
    Ok(v)
}

/// Saves a network as safetensors. An MLP's keys are those of PyTorch's
/// `nn.Sequential(Linear, ReLU, Linear, ...)` (`0.weight` `[out, in]`, `0.bias`, `2.weight`, ...), so
/// `model.load_state_dict(load_file(path))` works; a CNN's are described at `cnn_tensors`.
/// Metadata records the architecture.
pub fn save_net<B: Backend>(net: &Net<B>, backend: &B, path: &Path) -> Result<()> {
    let (tensors, arch) = match net {
        Net::Mlp(m) => (mlp_tensors(m, backend)?, format!("mlp {:?}", m.sizes())),
        Net::Cnn(c) => (
            cnn_tensors(c, backend)?,
            format!(
                "cnn image {:?}, channels {:?}",
                c.image,
                c.convs.iter().map(|c| c.out_channels()).collect::<Vec<_>>()
            ),
        ),
    };
    // A diverged network (NaN or inf weights) would be written as a file that
    // `Checkpoint::load` refuses: an error here instead.
    for (name, _, d) in &tensors {
        if let Some(i) = d.iter().position(|v| !v.is_finite()) {
            return Err(Error::io(
                "write",
                path,
                format!(
                    "{name}[{i}] = {}: the network has non-finite weights (training diverged: \
                     lower the learning rate)",
                    d[i]
                ),
            ));
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, d)| (n, s, bytemuck::cast_slice(&d).to_vec()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::io("write", path, format!("safetensors tensor {name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([
        ("architecture".to_string(), arch),
        ("format".to_string(), "pt".to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| {
        Error::io(
            "write",
            path,
            format!("{e} (check that the folder exists and is writable)"),
        )
    })
}

//! Outputs of a run: the training curves as an SVG plot, and the student saved as safetensors with
//! the names and layouts PyTorch's `nn.Sequential(Linear, ReLU, Linear, ...)` loads.

use std::collections::HashMap;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::experiment::Report;
use crate::nn::Mlp;

/// Mean training loss per epoch: one panel each for the teacher (cross-entropy), the distilled
/// student (its objective `alpha CE + (1 - alpha) T^2 KL`) and the simple model (cross-entropy),
/// each on its own scale, one line per fold.
pub fn curves_svg(r: &Report) -> String {
    let panels: [(&str, &str, Vec<&Vec<f64>>); 3] = [
        (
            "teacher: cross-entropy",
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

/// Saves an MLP as safetensors: `{2i}.weight` `[out, in]` and `{2i}.bias` for layer `i`, the keys
/// of `nn.Sequential(Linear, ReLU, Linear, ...)`, so `model.load_state_dict(load_file(path))`
/// works in PyTorch. Metadata records the layer sizes.
pub fn save_mlp<B: Backend>(mlp: &Mlp<B>, backend: &B, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, layer) in mlp.layers.iter().enumerate() {
        let (inp, out) = (layer.inputs(), layer.outputs());
        let w = layer.weight.value.to_host(backend)?;
        let mut wt = vec![0f32; w.len()];
        for r in 0..inp {
            for c in 0..out {
                wt[c * inp + r] = w[r * out + c]; // ours [in, out] -> PyTorch [out, in]
            }
        }
        let b = layer.bias.value.to_host(backend)?;
        tensors.push((
            format!("{}.weight", 2 * i),
            vec![out, inp],
            bytemuck::cast_slice(&wt).to_vec(),
        ));
        tensors.push((
            format!("{}.bias", 2 * i),
            vec![out],
            bytemuck::cast_slice(&b).to_vec(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Unsupported(format!("safetensors: {e}")))
        })
        .collect::<Result<_>>()?;
    let sizes = mlp
        .sizes()
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let meta = HashMap::from([
        ("sizes".to_string(), sizes),
        ("format".to_string(), "pt".to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::Unsupported(format!("cannot write {}: {e}", path.display())))
}

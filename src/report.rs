//! Outputs of a run: the training curves as an SVG plot, and the student saved as safetensors with
//! the names and layouts PyTorch's `nn.Sequential(Linear, ReLU, Linear, ...)` loads.

use std::collections::HashMap;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::experiment::Report;
use crate::nn::Mlp;

/// Mean loss per epoch of teacher, distilled student and simple model, one line per fold.
pub fn curves_svg(r: &Report) -> String {
    let (w, h, pad) = (720.0, 420.0, 50.0);
    let series: Vec<(&str, &str, Vec<&Vec<f64>>)> = vec![
        ("teacher", "#1f77b4", r.folds.iter().map(|f| &f.teacher_curve).collect()),
        ("distilled student (objective)", "#d62728", r.folds.iter().map(|f| &f.student_curve).collect()),
        ("simple (cross-entropy)", "#2ca02c", r.folds.iter().map(|f| &f.simple_curve).collect()),
    ];
    let finite = |v: &f64| v.is_finite();
    let max_y = series.iter().flat_map(|s| s.2.iter().flat_map(|c| c.iter())).copied().filter(finite).fold(1e-9, f64::max);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">training loss per epoch (each line a fold; x: share of training)</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n",
        w / 2.0,
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    for k in 0..=4 {
        let v = max_y * k as f64 / 4.0;
        let y = h - pad - (h - 2.0 * pad) * k as f64 / 4.0;
        out += &format!("<text x=\"{}\" y=\"{y:.1}\" text-anchor=\"end\">{v:.2}</text>\n", pad - 5.0);
    }
    for (si, (name, color, curves)) in series.iter().enumerate() {
        for c in curves {
            if c.is_empty() {
                continue;
            }
            let pts: Vec<String> = c
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| {
                    let x = pad + (w - 2.0 * pad) * (i as f64 + 1.0) / c.len() as f64;
                    let y = h - pad - (h - 2.0 * pad) * (v / max_y).min(1.0);
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            out += &format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.2\" points=\"{}\"/>\n", pts.join(" "));
        }
        let ly = pad + 18.0 * si as f64;
        out += &format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            w - 260.0,
            w - 235.0,
            w - 228.0,
            ly + 4.0
        );
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
        tensors.push((format!("{}.weight", 2 * i), vec![out, inp], bytemuck::cast_slice(&wt).to_vec()));
        tensors.push((format!("{}.bias", 2 * i), vec![out], bytemuck::cast_slice(&b).to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Unsupported(format!("safetensors: {e}")))
        })
        .collect::<Result<_>>()?;
    let sizes = mlp.sizes().iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let meta = HashMap::from([("sizes".to_string(), sizes), ("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| Error::Unsupported(format!("cannot write {}: {e}", path.display())))
}

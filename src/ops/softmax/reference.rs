//! The f64 CPU reference of temperature softmax / log-softmax and their backward (the math is in
//! [`super`]).

/// `log_softmax(z / t)` of one row, with max-subtraction, in f64.
pub fn log_softmax_row(z: &[f64], t: f64) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = z.iter().map(|&v| ((v - m) / t).exp()).sum::<f64>().ln();
    z.iter().map(|&v| (v - m) / t - lse).collect()
}

/// True when every element is finite; rows with a NaN or infinity produce NaN outputs.
pub(crate) fn all_finite(z: &[f64]) -> bool {
    z.iter().all(|v| v.is_finite())
}

/// The CPU reference forward over `[rows, cols]`.
pub fn softmax(x: &[f64], cols: usize, t: f64, log: bool) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        if !all_finite(row) {
            y.extend(std::iter::repeat_n(f64::NAN, cols));
            continue;
        }
        let lp = log_softmax_row(row, t);
        if log {
            y.extend(lp);
        } else {
            y.extend(lp.into_iter().map(f64::exp));
        }
    }
    y
}

/// The CPU reference backward from the forward output `y` and the upstream gradient `dy`.
pub fn softmax_backward(y: &[f64], dy: &[f64], cols: usize, t: f64, log: bool) -> Vec<f64> {
    let mut dx = Vec::with_capacity(y.len());
    for (yr, dyr) in y.chunks(cols).zip(dy.chunks(cols)) {
        if log {
            let sum_dy: f64 = dyr.iter().sum();
            dx.extend(
                yr.iter()
                    .zip(dyr)
                    .map(|(&l, &d)| (d - l.exp() * sum_dy) / t),
            );
        } else {
            let dot: f64 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
            dx.extend(yr.iter().zip(dyr).map(|(&p, &d)| p * (d - dot) / t));
        }
    }
    dx
}

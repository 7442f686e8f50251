//! Layer norm of `x + residual`, one row at a time on the calling thread (CPU, f32).
//!
//! candle's layer norm hands every call to rayon's pool. The server gives that pool one thread,
//! because each model instance is its own compute thread, so each norm (13 per BERT forward pass)
//! was a hand-off, a sleep and a wake-up, and the instances queued for the same pool thread. Here
//! the residual add and the norm are one pass over each row while it is in L1, with no tensor in
//! between. The mean and variance are taken in two passes (candle uses E[x²] − mean², which
//! loses digits when the mean is large), with sixteen partial sums so the loops vectorise. Rows
//! never see each other, so the result of a row does not depend on its batch.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};

/// The op: weight, bias and epsilon of one norm, held on the host.
pub struct AddNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl AddNorm {
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, eps: f32) -> Self {
        assert_eq!(
            weight.len(),
            bias.len(),
            "one weight and one bias per column"
        );
        Self { weight, bias, eps }
    }

    /// `x` and `residual` (if any) are `[rows, width]` row-major, as is `out`.
    pub fn forward(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let width = self.weight.len();
        assert_eq!(x.len(), out.len(), "out has x's shape");
        assert_eq!(x.len() % width, 0, "x is [rows, {width}]");
        if let Some(r) = residual {
            assert_eq!(r.len(), x.len(), "residual has x's shape");
        }
        norm_rows(x, residual, &self.weight, &self.bias, self.eps, out);
    }

    /// `name`: the op's form (with or without the residual), for the errors.
    fn run(
        &self,
        name: &str,
        x: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = super::contiguous_f32(name, x.0, x.1)?;
        let shape = x.1.shape();
        let width = shape.dims().last().copied().unwrap_or(0);
        if width != self.weight.len() {
            candle_core::bail!(
                "{name}: rows of {width} for a norm over {}",
                self.weight.len()
            );
        }
        let residual = match residual {
            Some((_, layout)) if layout.shape() != shape => {
                candle_core::bail!("{name}: residual {:?} for x {:?}", layout.shape(), shape)
            }
            Some((storage, layout)) => Some(super::contiguous_f32(name, storage, layout)?),
            None => None,
        };
        // Safety: `forward` writes every row whole.
        let out =
            unsafe { super::fresh_output(data.len(), |out| self.forward(data, residual, out)) };
        Ok((CpuStorage::F32(out), shape.clone()))
    }
}

impl CustomOp1 for AddNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(CustomOp1::name(self), (x, layout), None)
    }
}

impl CustomOp2 for AddNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(
            CustomOp2::name(self),
            (x, x_layout),
            Some((residual, residual_layout)),
        )
    }
}

/// Lanes of partial sums: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// The sum of `values` in `LANES` partial sums, added up at the end: the same order on every
/// CPU, since the vector widths only change how many lanes one instruction covers.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

super::fma_dispatched! {
    fn norm_rows(
        x: &[f32],
        residual: Option<&[f32]>,
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        out: &mut [MaybeUninit<f32>],
    ) {
        let width = weight.len();
        for (row, dst) in out.chunks_exact_mut(width).enumerate() {
            let src = &x[row * width..(row + 1) * width];
            match residual {
                Some(r) => {
                    let r = &r[row * width..(row + 1) * width];
                    for ((d, &a), &b) in dst.iter_mut().zip(src).zip(r) {
                        d.write(a + b);
                    }
                }
                None => {
                    dst.write_copy_of_slice(src);
                }
            }
            // Safety: every element of the row was just written.
            let dst = unsafe { dst.assume_init_mut() };
            let n = width as f32;
            let mean = lane_sum(dst, |v| v) / n;
            let var = lane_sum(dst, |v| (v - mean) * (v - mean)) / n;
            let inv_std = (var + eps).sqrt().recip();
            for ((d, &w), &b) in dst.iter_mut().zip(weight).zip(bias) {
                *d = (*d - mean) * inv_std * w + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::as_uninit;
    use candle_core::{Device, Tensor};

    /// Deterministic values with a large common offset, where E[x²] − mean² loses digits.
    fn values(n: usize, seed: u32, offset: f32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                offset + (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Layer norm of `x + r` in f64, the plain way, after the f32 add every form of the model does.
    fn reference(x: &[f32], r: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
        let width = w.len();
        let mut out = Vec::with_capacity(x.len());
        for (xs, rs) in x.chunks(width).zip(r.chunks(width)) {
            let s: Vec<f64> = xs.iter().zip(rs).map(|(&a, &b)| (a + b) as f64).collect();
            let mean = s.iter().sum::<f64>() / width as f64;
            let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, v) in s.iter().enumerate() {
                out.push(((v - mean) * inv * w[i] as f64 + b[i] as f64) as f32);
            }
        }
        out
    }

    #[test]
    fn matches_f64_and_candle_for_widths_with_and_without_a_tail() {
        for (width, offset) in [(384, 0.0), (384, 40.0), (37, 3.0), (8, 0.0)] {
            let rows = 5;
            let x = values(rows * width, 1, offset);
            let r = values(rows * width, 2, 0.0);
            let (w, b) = (values(width, 3, 1.0), values(width, 4, 0.0));
            let op = AddNorm::new(w.clone(), b.clone(), 1e-12);
            let mut out = vec![f32::NAN; x.len()];
            op.forward(&x, Some(&r), as_uninit(&mut out));
            let want = reference(&x, &r, &w, &b, 1e-12);
            for (got, want) in out.iter().zip(&want) {
                assert!(
                    (got - want).abs() <= 2e-5 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }

            // Through candle: the same bits as the slice form, and candle's own norm of the sum
            // where its E[x²] − mean² keeps its digits (no large offset; at 40 it is off by 3e-3).
            let dev = Device::Cpu;
            let xt = Tensor::from_vec(x.clone(), (rows, width), &dev).unwrap();
            let rt = Tensor::from_vec(r.clone(), (rows, width), &dev).unwrap();
            let got: Vec<f32> = xt
                .apply_op2_no_bwd(&rt, &op)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, out);
            if offset != 0.0 {
                continue;
            }
            let (wt, bt) = (
                Tensor::new(w.as_slice(), &dev).unwrap(),
                Tensor::new(b.as_slice(), &dev).unwrap(),
            );
            let sum = (&xt + &rt).unwrap();
            let candle: Vec<f32> = candle_nn::ops::layer_norm(&sum, &wt, &bt, 1e-12)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (got, want) in got.iter().zip(&candle) {
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn without_residual_is_the_plain_norm_and_rows_do_not_depend_on_the_batch() {
        let width = 384;
        let x = values(7 * width, 5, 2.0);
        let (w, b) = (values(width, 6, 1.0), values(width, 7, 0.0));
        let op = AddNorm::new(w.clone(), b.clone(), 1e-12);
        let mut all = vec![f32::NAN; x.len()];
        op.forward(&x, None, as_uninit(&mut all));
        let zeros = vec![0f32; x.len()];
        let want = reference(&x, &zeros, &w, &b, 1e-12);
        for (got, want) in all.iter().zip(&want) {
            assert!(
                (got - want).abs() <= 2e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        for row in 0..7 {
            let mut one = vec![f32::NAN; width];
            op.forward(
                &x[row * width..(row + 1) * width],
                None,
                as_uninit(&mut one),
            );
            assert_eq!(one, all[row * width..(row + 1) * width]);
        }
    }

    #[test]
    fn wrong_shapes_are_errors_not_panics() {
        let dev = Device::Cpu;
        let op = AddNorm::new(vec![1.0; 4], vec![0.0; 4], 1e-5);
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        let wide = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).unwrap();
        let short = Tensor::zeros((1, 4), candle_core::DType::F32, &dev).unwrap();
        // Each error names the form that failed and what was wrong.
        let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
        let e = err(wide.apply_op1_no_bwd(&op));
        assert!(
            e.contains("layer-norm: rows of 5") && !e.contains("add-"),
            "{e}"
        );
        let e = err(x.apply_op2_no_bwd(&short, &op));
        assert!(e.contains("add-layer-norm: residual"), "{e}");
        let bf16 = x.to_dtype(candle_core::DType::BF16).unwrap();
        let e = err(bf16.apply_op1_no_bwd(&op));
        assert!(
            e.contains("layer-norm takes f32") && !e.contains("add-"),
            "{e}"
        );
    }
}

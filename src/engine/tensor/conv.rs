//! 2-D convolution for ONNX `Conv` nodes: im2col copied in contiguous runs of the input, then one
//! matmul for the whole batch. candle 0.11's CPU `conv2d` builds its im2col tiles element by
//! element with strided writes, which took most of the demo CNN's time (BENCHMARKS.md).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_onnx::onnx;

/// A Conv node this kernel runs: 2-D, one group, no dilation, explicit padding, f32 weights (and
/// bias) from the graph's initializers.
pub struct Conv2d {
    /// `[filters, channels · kernel_h · kernel_w]`.
    weight: Tensor,
    /// `[filters, 1]`.
    bias: Option<Tensor>,
    filters: usize,
    channels: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    /// Top, left, bottom, right.
    pads: [usize; 4],
}

impl Conv2d {
    /// The kernel for `node`, or `None` when it does not cover it (candle-onnx runs it then).
    pub fn from_node(node: &onnx::NodeProto, weights: &HashMap<String, Tensor>) -> Option<Self> {
        // The step that runs it reads input 0 and writes output 0.
        node.input.first().filter(|x| !x.is_empty())?;
        node.output.first()?;
        let ints = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.ints.clone())
        };
        let string = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| String::from_utf8_lossy(&a.s).into_owned())
        };
        let group = node
            .attribute
            .iter()
            .find(|a| a.name == "group")
            .map_or(1, |a| a.i);
        let auto_pad = string("auto_pad").unwrap_or_default();
        if group != 1 || !(auto_pad.is_empty() || auto_pad == "NOTSET") {
            return None;
        }
        if ints("dilations").is_some_and(|d| d.iter().any(|&x| x != 1)) {
            return None;
        }
        let weight = weights.get(node.input.get(1)?)?;
        let (filters, channels, kh, kw) = weight.dims4().ok()?;
        if weight.dtype() != DType::F32 {
            return None;
        }
        let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
            Some(name) => {
                let b = weights.get(name)?;
                (b.dtype() == DType::F32 && b.dims() == [filters]).then_some(())?;
                Some(b.reshape((filters, 1)).ok()?)
            }
            None => None,
        };
        let stride = match ints("strides").as_deref() {
            None => (1, 1),
            Some([h, w]) if *h > 0 && *w > 0 => (*h as usize, *w as usize),
            Some(_) => return None,
        };
        let pads = match ints("pads").as_deref() {
            None => [0; 4],
            Some([t, l, b, r]) if [t, l, b, r].iter().all(|&&p| p >= 0) => {
                [*t as usize, *l as usize, *b as usize, *r as usize]
            }
            Some(_) => return None,
        };
        Some(Self {
            weight: weight.reshape((filters, channels * kh * kw)).ok()?,
            bias,
            filters,
            channels,
            kernel: (kh, kw),
            stride,
            pads,
        })
    }

    /// `x` `[n, channels, h, w]` (f32) → `[n, filters, out_h, out_w]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.channels || x.dtype() != DType::F32 {
            candle_core::bail!(
                "Conv takes f32 input of {} channels, got {:?} of shape {:?}",
                self.channels,
                x.dtype(),
                x.dims()
            );
        }
        let ((kh, kw), (sh, sw), [pt, pl, pb, pr]) = (self.kernel, self.stride, self.pads);
        if h + pt + pb < kh || w + pl + pr < kw {
            candle_core::bail!("Conv input {h}x{w} is smaller than its {kh}x{kw} kernel");
        }
        let (oh, ow) = ((h + pt + pb - kh) / sh + 1, (w + pl + pr - kw) / sw + 1);
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        // cols: [c·kh·kw, n·oh·ow]; each row a kernel tap, each column an output pixel.
        let pixels = n * oh * ow;
        let mut cols = vec![0f32; c * kh * kw * pixels];
        for ch in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    let row = &mut cols[((ch * kh + i) * kw + j) * pixels..][..pixels];
                    for img in 0..n {
                        let plane = &input[(img * c + ch) * h * w..][..h * w];
                        for oy in 0..oh {
                            let Some(iy) = (oy * sh + i).checked_sub(pt).filter(|&y| y < h) else {
                                continue;
                            };
                            let src = &plane[iy * w..][..w];
                            let dst = &mut row[(img * oh + oy) * ow..][..ow];
                            if sw == 1 && pl == 0 && j + ow <= w {
                                dst.copy_from_slice(&src[j..j + ow]);
                                continue;
                            }
                            for (ox, out) in dst.iter_mut().enumerate() {
                                if let Some(ix) = (ox * sw + j).checked_sub(pl).filter(|&x| x < w) {
                                    *out = src[ix];
                                }
                            }
                        }
                    }
                }
            }
        }
        let cols = Tensor::from_vec(cols, (c * kh * kw, pixels), &Device::Cpu)?;
        let mut out = self.weight.matmul(&cols)?;
        if let Some(bias) = &self.bias {
            out = out.broadcast_add(bias)?;
        }
        out.reshape((self.filters, n, oh, ow))?
            .transpose(0, 1)?
            .contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pseudo_random;

    fn attr_ints(name: &str, ints: &[i64]) -> onnx::AttributeProto {
        onnx::AttributeProto {
            name: name.into(),
            ints: ints.to_vec(),
            r#type: onnx::attribute_proto::AttributeType::Ints as i32,
            ..Default::default()
        }
    }

    /// Equal to candle's own conv2d (padding symmetric there) for strides, padding and shapes
    /// where the tiles and the fast path differ.
    #[test]
    fn matches_candles_conv2d() {
        for (n, c, h, w, f, k, stride, pad) in [
            (1, 1, 28, 28, 32, 3, 1, 0),
            (3, 32, 26, 26, 64, 3, 1, 0),
            (2, 3, 9, 11, 4, 3, 2, 1),
            (2, 2, 7, 5, 3, 5, 1, 2),
            (1, 4, 6, 6, 2, 1, 1, 0),
        ] {
            let x = Tensor::from_vec(pseudo_random(n * c * h * w, 1), (n, c, h, w), &Device::Cpu)
                .unwrap();
            let wt = Tensor::from_vec(pseudo_random(f * c * k * k, 2), (f, c, k, k), &Device::Cpu)
                .unwrap();
            let b = Tensor::from_vec(pseudo_random(f, 3), f, &Device::Cpu).unwrap();
            let weights =
                HashMap::from([("w".to_string(), wt.clone()), ("b".to_string(), b.clone())]);
            let node = onnx::NodeProto {
                op_type: "Conv".into(),
                input: vec!["x".into(), "w".into(), "b".into()],
                output: vec!["y".into()],
                attribute: vec![
                    attr_ints("strides", &[stride as i64; 2]),
                    attr_ints("pads", &[pad as i64; 4]),
                ],
                ..Default::default()
            };
            let ours = Conv2d::from_node(&node, &weights)
                .unwrap()
                .forward(&x)
                .unwrap();
            let theirs = x
                .conv2d(&wt, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, f, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{n}x{c}x{h}x{w} k{k} s{stride} p{pad}: {diff}");
        }
    }

    #[test]
    fn nodes_it_does_not_cover_are_left_to_candle() {
        let wt = Tensor::zeros((2, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let weights = HashMap::from([("w".to_string(), wt)]);
        let node = |attribute| onnx::NodeProto {
            op_type: "Conv".into(),
            input: vec!["x".into(), "w".into()],
            output: vec!["y".into()],
            attribute,
            ..Default::default()
        };
        assert!(Conv2d::from_node(&node(vec![]), &weights).is_some());
        assert!(
            Conv2d::from_node(&node(vec![attr_ints("dilations", &[2, 2])]), &weights).is_none()
        );
        let group = onnx::AttributeProto {
            name: "group".into(),
            i: 2,
            ..Default::default()
        };
        assert!(Conv2d::from_node(&node(vec![group]), &weights).is_none());
        let mut computed = node(vec![]);
        computed.input[1] = "not_an_initializer".into();
        assert!(Conv2d::from_node(&computed, &weights).is_none());
    }
}

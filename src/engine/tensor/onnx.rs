//! ONNX graphs on candle-onnx: load a `.onnx` file, read the served inputs and outputs from the
//! graph (narrowed by `model.toml`), refuse what candle cannot run at load time, and run batches.
//!
//! candle-onnx evaluates the graph node by node. Its constants and initializers live on the CPU,
//! so tensor models run on the CPU whatever `--device` says; the classifiers this serves are
//! small enough that a transfer would cost more than the compute.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx;

use super::plan::{steps, Step};
use super::signature::{signature, Signature};
use super::{DataType, HostTensor, TensorData};
use crate::batching::BatchEngine;
use crate::engine::EngineError;
use crate::repository::TensorOptions;

/// The operators candle-onnx 0.11.1 evaluates (its `simple_eval` match arms), in the default
/// domain. Checked at load so a model fails then, naming the operator, not on its first request.
#[rustfmt::skip]
const SUPPORTED_OPS: &[&str] = &[
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil",
    "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos", "CumSum", "Div", "Dropout",
    "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "Gelu", "Gemm",
    "Greater", "GreaterOrEqual", "HardSwish", "Identity", "If", "LSTM", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "LogSoftmax", "MatMul", "MaxPool", "Min", "Mul", "Neg", "Not", "OneHot",
    "Or", "PRelu", "Pad", "Pow", "RNN", "Range", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceSum", "Relu", "Reshape", "Resize", "ScatterND", "Selu", "Shape", "Sigmoid", "Sign",
    "Sin", "Size", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile",
    "Transpose", "Trilu", "Unsqueeze", "Where", "Xor",
];

/// What the load log and `/metrics` report.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub parameters: usize,
    pub operators: usize,
    pub opset: i64,
}

struct Graph {
    /// The graph's nodes in order, as steps.
    steps: Vec<Step>,
    /// Initializers decoded once; candle-onnx would decode them again on every run.
    weights: HashMap<String, Tensor>,
    signature: Signature,
}

/// A loaded graph; clones share it (one per batching instance).
#[derive(Clone)]
pub struct OnnxEngine {
    graph: Arc<Graph>,
}

/// Loads `path`, checks its operators and types, and runs it once on zeros where every
/// dimension but the batch is known, so a graph candle cannot run fails here.
pub fn load(path: &Path, options: &TensorOptions) -> Result<(OnnxEngine, TensorInfo), EngineError> {
    let bad = |message: String| EngineError::file(path, message);
    let mut model = candle_onnx::read_file(path).map_err(|e| match e {
        candle_core::Error::Io(e) => bad(e.to_string()),
        e => bad(format!("not an ONNX model: {e}")),
    })?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| bad("the file holds no graph".into()))?;
    check_operators(graph).map_err(bad)?;
    let operators = graph.node.len();
    let mut weights = HashMap::new();
    for init in std::mem::take(&mut graph.initializer) {
        let tensor = candle_onnx::eval::get_tensor(&init, &init.name)
            .map_err(|e| bad(format!("initializer {:?}: {e}", init.name)))?;
        weights.insert(init.name, tensor);
    }
    let parameters = weights.values().map(Tensor::elem_count).sum();
    let signature = signature(graph, &weights, options).map_err(bad)?;
    let steps = steps(model, &weights);
    let mut engine = OnnxEngine {
        graph: Arc::new(Graph {
            steps,
            weights,
            signature,
        }),
    };
    engine.warm_up().map_err(bad)?;
    Ok((
        engine,
        TensorInfo {
            parameters,
            operators,
            opset,
        },
    ))
}

impl OnnxEngine {
    pub fn signature(&self) -> &Signature {
        &self.graph.signature
    }

    /// Runs one row of zeros and checks the outputs against the signature; outputs whose shape
    /// the graph leaves open take the computed one. Skipped while an input has an open
    /// dimension other than the batch: there is no shape to make zeros of.
    fn warm_up(&mut self) -> Result<(), String> {
        let signature = &self.graph.signature;
        let mut zeros = Vec::new();
        for spec in &signature.inputs {
            let shape: Option<Vec<usize>> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match d {
                    -1 if i == 0 && signature.batched => Some(1),
                    -1 => None,
                    d => Some(d as usize),
                })
                .collect();
            let Some(shape) = shape else {
                tracing::debug!(input = %spec.name, "no warm-up run: an input has an open dimension");
                return Ok(());
            };
            zeros.push(zeros_of(spec.datatype, shape)?);
        }
        let outputs = self
            .forward(zeros)
            .map_err(|e| format!("a trial run on zeros failed: {e}"))?;
        let mut signature = signature.clone();
        for (spec, out) in signature.outputs.iter_mut().zip(&outputs) {
            let computed: Vec<i64> = out.shape().iter().map(|&d| d as i64).collect();
            if spec.shape.is_empty() {
                spec.shape = computed;
                if signature.batched {
                    spec.shape[0] = -1;
                }
                continue;
            }
            let fits = spec.shape.len() == computed.len()
                && spec
                    .shape
                    .iter()
                    .zip(&computed)
                    .enumerate()
                    .all(|(i, (&want, &got))| {
                        want == -1 || want == got || (i == 0 && signature.batched)
                    });
            if !fits {
                return Err(format!(
                    "output {:?} is declared {:?} but a trial run on one row computes {:?}",
                    spec.name, spec.shape, computed
                ));
            }
        }
        if let Some(graph) = Arc::get_mut(&mut self.graph) {
            graph.signature = signature;
        }
        Ok(())
    }

    /// Runs the graph on whole tensors (one per input, in signature order); returns one tensor
    /// per output, in signature order.
    fn forward(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, String> {
        let graph = &*self.graph;
        let mut values = HashMap::new();
        for (spec, tensor) in graph.signature.inputs.iter().zip(inputs) {
            values.insert(spec.name.clone(), to_candle(tensor)?);
        }
        let value = |values: &HashMap<String, Tensor>, name: &str| {
            values
                .get(name)
                .or_else(|| graph.weights.get(name))
                .cloned()
                .ok_or_else(|| format!("the graph computed no value {name:?}"))
        };
        for step in &graph.steps {
            match step {
                Step::Candle { model, inputs } => {
                    let given = inputs
                        .iter()
                        .filter_map(|name| Some((name.clone(), value(&values, name).ok()?)))
                        .collect();
                    let computed =
                        candle_onnx::simple_eval(model, given).map_err(|e| e.to_string())?;
                    values.extend(computed);
                }
                Step::Conv {
                    conv,
                    input,
                    output,
                } => {
                    let x = value(&values, input)?;
                    let y = conv
                        .forward(&x)
                        .map_err(|e| format!("Conv producing {output:?}: {e}"))?;
                    values.insert(output.clone(), y);
                }
            }
        }
        graph
            .signature
            .outputs
            .iter()
            .map(|spec| {
                let tensor = value(&values, &spec.name)?;
                from_candle(&tensor, spec.datatype)
                    .map_err(|e| format!("output {:?}: {e}", spec.name))
            })
            .collect()
    }
}

impl BatchEngine for OnnxEngine {
    /// One request's tensors, one per input in signature order; all share dimension 0.
    type Input = Vec<HostTensor>;
    /// Its outputs, one per output in signature order, with its rows.
    type Output = Vec<HostTensor>;

    /// Requests whose inputs agree in every dimension but the first are stacked into one
    /// forward pass and split back; others run in passes of their own.
    fn run(&mut self, items: Vec<Self::Input>) -> Result<Vec<Self::Output>, String> {
        let mut results: Vec<Option<Self::Output>> = vec![None; items.len()];
        for group in self.groups(&items) {
            let inputs = if group.len() == 1 {
                items[group[0]].clone()
            } else {
                (0..self.graph.signature.inputs.len())
                    .map(|j| {
                        let parts: Vec<&HostTensor> = group.iter().map(|&i| &items[i][j]).collect();
                        HostTensor::concat_rows(&parts)
                    })
                    .collect::<Result<_, _>>()?
            };
            let outputs = self.forward(inputs)?;
            if !self.graph.signature.batched {
                // One request, whole: its outputs need not have a batch dimension at all.
                results[group[0]] = Some(outputs);
                continue;
            }
            let rows: usize = group.iter().map(|&i| rows_of(&items[i])).sum();
            if let Some(out) = outputs.iter().find(|o| o.rows() != rows) {
                return Err(format!(
                    "the graph gave {} rows for a batch of {rows}: its outputs do not keep \
                     dimension 0 as the batch",
                    out.rows()
                ));
            }
            let mut start = 0;
            for &i in &group {
                let n = rows_of(&items[i]);
                results[i] = Some(outputs.iter().map(|o| o.rows_range(start, n)).collect());
                start += n;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every item belongs to a group"))
            .collect())
    }
}

impl OnnxEngine {
    /// Indices of the items that can share a forward pass.
    fn groups(&self, items: &[Vec<HostTensor>]) -> Vec<Vec<usize>> {
        if !self.graph.signature.batched {
            return (0..items.len()).map(|i| vec![i]).collect();
        }
        let mut groups: Vec<(Vec<&[usize]>, Vec<usize>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let key: Vec<&[usize]> = item
                .iter()
                .map(|t| t.shape().get(1..).unwrap_or(&[]))
                .collect();
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        groups.into_iter().map(|(_, members)| members).collect()
    }
}

fn rows_of(item: &[HostTensor]) -> usize {
    item.first().map_or(1, HostTensor::rows)
}

/// Operators outside candle-onnx's set (or another domain's), named with the nodes using them,
/// searching the branches of `If` too.
fn check_operators(graph: &onnx::GraphProto) -> Result<(), String> {
    fn walk(graph: &onnx::GraphProto, bad: &mut Vec<String>) {
        for node in &graph.node {
            let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
            if !default_domain || !SUPPORTED_OPS.contains(&node.op_type.as_str()) {
                let op = if default_domain {
                    node.op_type.clone()
                } else {
                    format!("{}.{}", node.domain, node.op_type)
                };
                bad.push(format!("{op} (node {:?})", node.name));
            }
            for attr in &node.attribute {
                for sub in attr.g.iter().chain(&attr.graphs) {
                    walk(sub, bad);
                }
            }
        }
    }
    let mut bad = Vec::new();
    walk(graph, &mut bad);
    if bad.is_empty() {
        return Ok(());
    }
    Err(format!(
        "unsupported ONNX operator{}: {}; this build runs the operators candle-onnx 0.11.1 implements",
        if bad.len() == 1 { "" } else { "s" },
        bad.join(", ")
    ))
}

fn zeros_of(datatype: DataType, shape: Vec<usize>) -> Result<HostTensor, String> {
    let n = shape.iter().product();
    let data = match datatype {
        DataType::Bool => TensorData::Bool(vec![false; n]),
        DataType::U8 => TensorData::U8(vec![0; n]),
        DataType::U32 => TensorData::U32(vec![0; n]),
        DataType::I64 => TensorData::I64(vec![0; n]),
        DataType::F16 => TensorData::F16(vec![half::f16::ZERO; n]),
        DataType::F32 => TensorData::F32(vec![0.0; n]),
        DataType::F64 => TensorData::F64(vec![0.0; n]),
        other => return Err(format!("no {other} inputs")),
    };
    HostTensor::new(shape, data)
}

fn to_candle(tensor: HostTensor) -> Result<Tensor, String> {
    let (shape, data) = tensor.into_parts();
    let cpu = &Device::Cpu;
    match data {
        TensorData::F32(v) => Tensor::from_vec(v, shape, cpu),
        TensorData::F64(v) => Tensor::from_vec(v, shape, cpu),
        TensorData::F16(v) => Tensor::from_vec(v, shape, cpu),
        TensorData::I64(v) => Tensor::from_vec(v, shape, cpu),
        TensorData::U32(v) => Tensor::from_vec(v, shape, cpu),
        TensorData::U8(v) => Tensor::from_vec(v, shape, cpu),
        // candle-onnx holds ONNX BOOL as u8 0/1.
        TensorData::Bool(v) => Tensor::from_vec(v.into_iter().map(u8::from).collect(), shape, cpu),
        other => return Err(format!("candle-onnx takes no {} inputs", other.datatype())),
    }
    .map_err(|e| e.to_string())
}

/// The computed tensor as `datatype`, converting where candle-onnx computes in a wider type
/// than the graph declares (it casts to INT32 as INT64, for one).
fn from_candle(tensor: &Tensor, datatype: DataType) -> Result<HostTensor, String> {
    let want = match datatype {
        DataType::Bool | DataType::U8 => DType::U8,
        DataType::U32 => DType::U32,
        DataType::I16 => DType::I16,
        DataType::I32 => DType::I32,
        DataType::I64 => DType::I64,
        DataType::F16 => DType::F16,
        DataType::Bf16 => DType::BF16,
        DataType::F32 => DType::F32,
        DataType::F64 => DType::F64,
        other => return Err(format!("cannot return {other}")),
    };
    let shape = tensor.dims().to_vec();
    let flat = tensor
        .flatten_all()
        .and_then(|t| t.to_dtype(want))
        .map_err(|e| e.to_string())?;
    let data = (|| {
        Ok::<_, candle_core::Error>(match datatype {
            DataType::Bool => {
                TensorData::Bool(flat.to_vec1::<u8>()?.into_iter().map(|b| b != 0).collect())
            }
            DataType::U8 => TensorData::U8(flat.to_vec1()?),
            DataType::U32 => TensorData::U32(flat.to_vec1()?),
            DataType::I16 => TensorData::I16(flat.to_vec1()?),
            DataType::I32 => TensorData::I32(flat.to_vec1()?),
            DataType::I64 => TensorData::I64(flat.to_vec1()?),
            DataType::F16 => TensorData::F16(flat.to_vec1()?),
            DataType::Bf16 => TensorData::Bf16(flat.to_vec1()?),
            DataType::F32 => TensorData::F32(flat.to_vec1()?),
            _ => TensorData::F64(flat.to_vec1()?),
        })
    })()
    .map_err(|e| e.to_string())?;
    HostTensor::new(shape, data)
}

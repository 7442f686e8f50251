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
use candle_onnx::onnx::{self, tensor_proto::DataType as OnnxType};

use super::conv::Conv2d;
use super::{DataType, HostTensor, TensorData};
use crate::batching::BatchEngine;
use crate::engine::EngineError;
use crate::repository::{TensorOptions, TensorShapeOverride};

/// The operators candle-onnx 0.11.1 evaluates (its `simple_eval` match arms), in the default
/// domain. Checked at load so a model fails then, naming the operator, not on its first request.
const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "CumSum",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "Gelu",
    "Gemm",
    "Greater",
    "GreaterOrEqual",
    "HardSwish",
    "Identity",
    "If",
    "LSTM",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "OneHot",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "RNN",
    "Range",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "ScatterND",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Tile",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
];

/// One input or output as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    /// `-1` for a dimension of any size.
    pub shape: Vec<i64>,
}

/// What a tensor model takes and gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Dimension 0 of every input and output is the batch: requests are stacked along it.
    /// Otherwise each request runs alone with exactly the declared shapes.
    pub batched: bool,
}

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

/// A run of nodes evaluated together.
enum Step {
    /// Nodes candle-onnx evaluates, as a graph of their own (no initializers: the weights come
    /// in with the values).
    Candle {
        model: Box<onnx::ModelProto>,
        /// The values its nodes read that come from before it.
        inputs: Vec<String>,
    },
    /// A convolution Ember's own kernel runs.
    Conv {
        conv: Conv2d,
        input: String,
        output: String,
    },
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

/// Cuts the graph's nodes into steps: each Conv that [`Conv2d`] covers runs on its own, every
/// run of other nodes as a graph candle-onnx evaluates, handed the values it reads and giving
/// back the values later steps (or the outputs) read. A graph with subgraphs (`If`) stays one
/// step: its branches read values from the enclosing scope.
fn steps(mut model: onnx::ModelProto, weights: &HashMap<String, Tensor>) -> Vec<Step> {
    let Some(graph) = model.graph.as_mut() else {
        return Vec::new();
    };
    let whole = |model: onnx::ModelProto| {
        let inputs = model
            .graph
            .iter()
            .flat_map(|g| &g.input)
            .map(|v| v.name.clone());
        let inputs = inputs.chain(weights.keys().cloned()).collect();
        vec![Step::Candle {
            model: Box::new(model),
            inputs,
        }]
    };
    let has_subgraphs = graph.node.iter().any(|n| {
        n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    });
    let convs: Vec<Option<Conv2d>> = graph
        .node
        .iter()
        .map(|n| {
            (n.op_type == "Conv")
                .then(|| Conv2d::from_node(n, weights))
                .flatten()
        })
        .collect();
    if has_subgraphs || convs.iter().all(Option::is_none) {
        return whole(model);
    }
    let nodes = std::mem::take(&mut graph.node);
    let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    // What each node reads, to know which values a run must hand on.
    let reads: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| n.input.iter().filter(|i| !i.is_empty()).cloned().collect())
        .collect();
    let mut steps = Vec::new();
    let mut run: Vec<onnx::NodeProto> = Vec::new();
    let flush = |run: &mut Vec<onnx::NodeProto>, steps: &mut Vec<Step>, next: usize| {
        if run.is_empty() {
            return;
        }
        let produced: Vec<&String> = run.iter().flat_map(|n| &n.output).collect();
        let mut inputs: Vec<String> = Vec::new();
        let mut made: Vec<&String> = Vec::new();
        for node in run.iter() {
            for name in node.input.iter().filter(|i| !i.is_empty()) {
                if !made.contains(&name) && !inputs.contains(name) {
                    inputs.push(name.clone());
                }
            }
            made.extend(&node.output);
        }
        let needed_later = |name: &String| {
            outputs.contains(name) || reads[next..].iter().any(|r| r.contains(name))
        };
        let value = |name: &String| onnx::ValueInfoProto {
            name: name.clone(),
            ..Default::default()
        };
        let output = produced
            .into_iter()
            .filter(|n| needed_later(n))
            .map(value)
            .collect();
        let graph = onnx::GraphProto {
            node: std::mem::take(run),
            input: inputs.iter().map(value).collect(),
            output,
            ..Default::default()
        };
        steps.push(Step::Candle {
            model: Box::new(onnx::ModelProto {
                graph: Some(graph),
                ..Default::default()
            }),
            inputs,
        });
    };
    for (i, (node, conv)) in nodes.into_iter().zip(convs).enumerate() {
        match conv {
            Some(conv) => {
                flush(&mut run, &mut steps, i);
                steps.push(Step::Conv {
                    conv,
                    input: node.input[0].clone(),
                    output: node.output[0].clone(),
                });
            }
            None => run.push(node),
        }
    }
    let end = reads.len();
    flush(&mut run, &mut steps, end);
    steps
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
            let rows: usize = group.iter().map(|&i| rows_of(&items[i])).sum();
            let outputs = self.forward(inputs)?;
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

/// The served inputs (graph inputs that are not initializers) and outputs, with `model.toml`'s
/// narrowing applied.
fn signature(
    graph: &onnx::GraphProto,
    weights: &HashMap<String, Tensor>,
    options: &TensorOptions,
) -> Result<Signature, String> {
    let mut inputs = Vec::new();
    for value in graph
        .input
        .iter()
        .filter(|v| !weights.contains_key(&v.name))
    {
        let (elem, shape) = tensor_type(value)?;
        let datatype = input_datatype(elem).ok_or_else(|| {
            format!(
                "input {:?} is of ONNX type {}, which candle-onnx cannot take as an input \
                 (it takes FLOAT, DOUBLE, FLOAT16, INT64, UINT8, UINT32 and BOOL)",
                value.name,
                onnx_type_name(elem)
            )
        })?;
        let shape = shape.ok_or_else(|| {
            format!(
                "input {:?} has no shape in the graph; give one under [[tensor.inputs]] in model.toml",
                value.name
            )
        })?;
        inputs.push(TensorSpec {
            name: value.name.clone(),
            datatype,
            shape,
        });
    }
    if inputs.is_empty() {
        return Err("the graph has no inputs to serve".into());
    }
    let mut outputs = Vec::new();
    for value in &graph.output {
        let (elem, shape) = tensor_type(value)?;
        let datatype = output_datatype(elem).ok_or_else(|| {
            format!(
                "output {:?} is of ONNX type {}, which this server cannot return",
                value.name,
                onnx_type_name(elem)
            )
        })?;
        outputs.push(TensorSpec {
            name: value.name.clone(),
            datatype,
            // Empty: unknown until the trial run computes it.
            shape: shape.unwrap_or_default(),
        });
    }
    narrow(&mut inputs, &options.inputs, "tensor.inputs")?;
    narrow(&mut outputs, &options.outputs, "tensor.outputs")?;
    let batch_dim_open = |t: &TensorSpec| t.shape.first() == Some(&-1);
    let batched = inputs.iter().all(batch_dim_open)
        && outputs
            .iter()
            .all(|t| t.shape.is_empty() || batch_dim_open(t));
    Ok(Signature {
        inputs,
        outputs,
        batched,
    })
}

/// Applies `model.toml`'s shapes: same rank, and a dimension the graph fixes stays fixed.
fn narrow(
    specs: &mut [TensorSpec],
    overrides: &[TensorShapeOverride],
    key: &str,
) -> Result<(), String> {
    let names = specs
        .iter()
        .map(|s| format!("{:?}", s.name))
        .collect::<Vec<_>>()
        .join(", ");
    for o in overrides {
        let Some(spec) = specs.iter_mut().find(|s| s.name == o.name) else {
            return Err(format!(
                "model.toml `{key}` names {:?}, which the graph does not have; it has {names}",
                o.name
            ));
        };
        if !spec.shape.is_empty() {
            if spec.shape.len() != o.shape.len() {
                return Err(format!(
                    "model.toml `{key}` gives {:?} the shape {:?}, of rank {}; the graph's is {:?}",
                    o.name,
                    o.shape,
                    o.shape.len(),
                    spec.shape
                ));
            }
            if let Some(i) =
                (0..o.shape.len()).find(|&i| spec.shape[i] != -1 && spec.shape[i] != o.shape[i])
            {
                return Err(format!(
                    "model.toml `{key}` gives {:?} the shape {:?}, but the graph fixes dimension \
                     {i} at {}",
                    o.name, o.shape, spec.shape[i]
                ));
            }
        }
        spec.shape = o.shape.clone();
    }
    Ok(())
}

/// The element type and shape (`-1` for open dimensions; `None` if the graph gives none).
fn tensor_type(value: &onnx::ValueInfoProto) -> Result<(i32, Option<Vec<i64>>), String> {
    use onnx::tensor_shape_proto::dimension::Value as Dim;
    use onnx::type_proto::Value;
    let Some(Value::TensorType(tensor)) = value.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(format!(
            "{:?} is not a tensor (sequences, maps and optionals are not served)",
            value.name
        ));
    };
    let shape = tensor.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) if v > 0 => v,
                _ => -1,
            })
            .collect()
    });
    Ok((tensor.elem_type, shape))
}

fn input_datatype(elem: i32) -> Option<DataType> {
    Some(match OnnxType::try_from(elem).ok()? {
        OnnxType::Float => DataType::F32,
        OnnxType::Double => DataType::F64,
        OnnxType::Float16 => DataType::F16,
        OnnxType::Int64 => DataType::I64,
        OnnxType::Uint8 => DataType::U8,
        OnnxType::Uint32 => DataType::U32,
        OnnxType::Bool => DataType::Bool,
        _ => return None,
    })
}

fn output_datatype(elem: i32) -> Option<DataType> {
    Some(match OnnxType::try_from(elem).ok()? {
        OnnxType::Bfloat16 => DataType::Bf16,
        OnnxType::Int32 => DataType::I32,
        OnnxType::Int16 => DataType::I16,
        _ => return input_datatype(elem),
    })
}

fn onnx_type_name(elem: i32) -> String {
    OnnxType::try_from(elem).map_or_else(|_| format!("#{elem}"), |t| t.as_str_name().to_string())
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

//! What a tensor model takes and gives: its inputs and outputs read from the ONNX graph (names,
//! datatypes, shapes with -1 for open dimensions), narrowed by `model.toml`, and whether it
//! batches along dimension 0.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_onnx::onnx::{self, tensor_proto::DataType as OnnxType};

use super::DataType;
use crate::repository::{TensorOptions, TensorShapeOverride};

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

/// The served inputs (graph inputs that are not initializers) and outputs, with `model.toml`'s
/// narrowing applied.
pub(super) fn signature(
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

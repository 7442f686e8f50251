//! The KServe v2 wire format of tensors, both ways: JSON `data` (flat or nested, row-major) and
//! the binary tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes,
//! then each binary tensor's little-endian bytes in order), as Triton speaks it.

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use half::{bf16, f16};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::engine::tensor::{element_count, DataType, HostTensor, TensorData};
use crate::server::error::{parse_json_bytes, ApiError};

/// The header that gives the length of the JSON part of a binary request or response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Deserialize, utoipa::ToSchema)]
pub struct InferRequest {
    id: Option<String>,
    inputs: Vec<InferInput>,
    outputs: Option<Vec<RequestedOutput>>,
    /// `binary_data_output` (all outputs binary); sampling settings of generation models;
    /// `truncate` for embedding models.
    parameters: Option<Map<String, Value>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    /// `binary_data_size`: this tensor's bytes follow the JSON header instead of `data`.
    parameters: Option<Map<String, Value>>,
    /// Row-major elements, flat or nested.
    data: Option<Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct RequestedOutput {
    name: String,
    /// `binary_data` (bool): return this output as binary; `classification` (n): return the
    /// top n classes of each row as "score:index" strings.
    parameters: Option<Map<String, Value>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct InferResponse {
    model_name: String,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    outputs: Vec<OutputTensor>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct OutputTensor {
    name: String,
    datatype: &'static str,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    /// Row-major elements; absent when the tensor is sent binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Value>>)]
    data: Option<JsonData>,
}

/// A request with its tensors decoded.
pub struct Request {
    pub id: Option<String>,
    pub inputs: Vec<(String, HostTensor)>,
    /// The outputs asked for, in order; `None` for all of them.
    pub outputs: Option<Vec<OutputChoice>>,
    /// The request's parameters other than `binary_data_output`, for the model to read.
    pub parameters: Map<String, Value>,
    binary_output: bool,
}

/// One requested output and how it is to be returned.
pub struct OutputChoice {
    pub name: String,
    binary: Option<bool>,
    classification: Option<usize>,
}

/// Decodes a request: JSON, or a JSON header followed by binary tensor data.
pub fn decode(headers: &HeaderMap, body: &Bytes) -> Result<Request, ApiError> {
    let (json, mut binary) = split_body(headers, body)?;
    let wire: InferRequest = parse_json_bytes(json)?;
    let mut inputs = Vec::with_capacity(wire.inputs.len());
    for input in wire.inputs {
        let name = input.name.clone();
        let tensor = decode_input(input, &mut binary)
            .map_err(|problem| ApiError::bad_request(format!("input {name:?}: {problem}")))?;
        inputs.push((name, tensor));
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the body holds {} bytes after the inputs' binary data; the inputs' \
             `binary_data_size` parameters must add up to what follows the JSON header",
            binary.len()
        )));
    }
    let mut parameters = wire.parameters.unwrap_or_default();
    let binary_output = match parameters.remove("binary_data_output") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "parameter \"binary_data_output\" must be true or false, not {other}"
            )))
        }
    };
    let outputs = wire
        .outputs
        .map(|outputs| outputs.into_iter().map(output_choice).collect())
        .transpose()?;
    Ok(Request {
        id: wire.id,
        inputs,
        outputs,
        parameters,
        binary_output,
    })
}

impl Request {
    /// Refuses outputs the model does not have, before any compute is spent.
    pub fn check_outputs<'a>(
        &self,
        model: &str,
        available: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), ApiError> {
        let chosen = self.outputs.as_deref().unwrap_or_default();
        for (i, choice) in chosen.iter().enumerate() {
            if chosen[..i].iter().any(|c| c.name == choice.name) {
                return Err(ApiError::bad_request(format!(
                    "output {:?} is asked for twice",
                    choice.name
                )));
            }
            if !available.clone().any(|name| name == choice.name) {
                let names: Vec<String> = available.map(|n| format!("{n:?}")).collect();
                return Err(ApiError::bad_request(format!(
                    "unknown output {:?}; model {model}'s outputs are {}",
                    choice.name,
                    names.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The response: the requested outputs (all, without a request) in the requested form.
    pub fn respond(
        self,
        model: &str,
        parameters: Option<Value>,
        mut computed: Vec<(String, HostTensor)>,
    ) -> Result<Response, ApiError> {
        let choices = self.outputs.unwrap_or_else(|| {
            computed
                .iter()
                .map(|(name, _)| OutputChoice {
                    name: name.clone(),
                    binary: None,
                    classification: None,
                })
                .collect()
        });
        let mut outputs = Vec::with_capacity(choices.len());
        let mut binary = Vec::new();
        for choice in choices {
            // `check_outputs` made sure each is there, once.
            let at = computed
                .iter()
                .position(|(name, _)| *name == choice.name)
                .ok_or_else(|| internal(format!("output {:?} was not computed", choice.name)))?;
            let (name, mut tensor) = computed.swap_remove(at);
            if let Some(k) = choice.classification {
                tensor = classify(&tensor, k)
                    .map_err(|e| ApiError::bad_request(format!("output {name:?}: {e}")))?;
            }
            let (shape, data) = tensor.into_parts();
            let datatype = data.datatype().name();
            if choice.binary.unwrap_or(self.binary_output) {
                let start = binary.len();
                write_binary(&data, &mut binary);
                outputs.push(OutputTensor {
                    name,
                    datatype,
                    shape,
                    parameters: Some(
                        serde_json::json!({ "binary_data_size": binary.len() - start }),
                    ),
                    data: None,
                });
            } else {
                outputs.push(OutputTensor {
                    name,
                    datatype,
                    shape,
                    parameters: None,
                    data: Some(JsonData(data)),
                });
            }
        }
        let response = InferResponse {
            model_name: model.to_string(),
            model_version: "1",
            id: self.id,
            parameters,
            outputs,
        };
        if binary.is_empty() {
            return Ok(Json(response).into_response());
        }
        let mut body = serde_json::to_vec(&response).map_err(|e| internal(e.to_string()))?;
        let header_length = body.len();
        body.extend_from_slice(&binary);
        let mut response = body.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(HEADER_LENGTH, HeaderValue::from(header_length));
        Ok(response)
    }
}

/// A failure that is the server's, not the request's (500).
pub(super) fn internal(message: String) -> ApiError {
    crate::registry::ModelError::Internal(message).into()
}

/// The JSON part and the binary part of the body.
fn split_body<'a>(headers: &HeaderMap, body: &'a Bytes) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let length = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n <= body.len())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "header Inference-Header-Content-Length must be the JSON header's length in \
                 bytes, at most the body's {} bytes",
                body.len()
            ))
        })?;
    Ok(body.split_at(length))
}

fn decode_input(input: InferInput, binary: &mut &[u8]) -> Result<HostTensor, String> {
    let datatype = DataType::from_name(&input.datatype).ok_or_else(|| {
        format!(
            "unknown datatype {:?}; the protocol's datatypes are {}",
            input.datatype,
            DataType::names().collect::<Vec<_>>().join(", ")
        )
    })?;
    let shape = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| format!("shape {:?} has a negative dimension", input.shape))?;
    let count = element_count(&shape)
        .ok_or_else(|| format!("shape {:?} has too many elements", input.shape))?;
    let mut binary_size = None;
    for (key, value) in input.parameters.iter().flatten() {
        match (key.as_str(), value.as_u64()) {
            ("binary_data_size", Some(n)) => binary_size = Some(n as usize),
            ("binary_data_size", None) => {
                return Err(format!(
                    "parameter binary_data_size must be a byte count, not {value}"
                ))
            }
            _ => {
                return Err(format!(
                    "unknown parameter {key:?}; inputs take binary_data_size"
                ))
            }
        }
    }
    let data = match (binary_size, &input.data) {
        (Some(_), Some(_)) => {
            return Err("has both `data` and binary_data_size; send one of them".into())
        }
        (None, None) => return Err("has no `data` (and no binary_data_size)".into()),
        (None, Some(data)) => from_json(datatype, count, data)?,
        (Some(size), None) => {
            if size > binary.len() {
                return Err(format!(
                    "binary_data_size is {size} bytes but only {} follow",
                    binary.len()
                ));
            }
            let (bytes, rest) = binary.split_at(size);
            *binary = rest;
            from_binary(datatype, count, bytes)?
        }
    };
    HostTensor::new(shape, data)
}

fn output_choice(output: RequestedOutput) -> Result<OutputChoice, ApiError> {
    let mut choice = OutputChoice {
        name: output.name,
        binary: None,
        classification: None,
    };
    for (key, value) in output.parameters.iter().flatten() {
        let bad = |what: &str| {
            ApiError::bad_request(format!(
                "output {:?}: parameter {key:?} must be {what}, not {value}",
                choice.name
            ))
        };
        match key.as_str() {
            "binary_data" => choice.binary = Some(value.as_bool().ok_or_else(|| bad("true or false"))?),
            "classification" => {
                choice.classification = Some(
                    value
                        .as_u64()
                        .filter(|&k| k >= 1)
                        .ok_or_else(|| bad("a class count of at least 1"))? as usize,
                )
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "output {:?}: unknown parameter {key:?}; outputs take binary_data and classification",
                    choice.name
                )))
            }
        }
    }
    Ok(choice)
}

/// Row-major JSON data, flat or nested to any depth, as `count` elements of `datatype`.
fn from_json(datatype: DataType, count: usize, data: &Value) -> Result<TensorData, String> {
    fn leaves<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| leaves(i, out)),
            leaf => out.push(leaf),
        }
    }
    let mut all = Vec::new();
    leaves(data, &mut all);
    if all.len() != count {
        return Err(format!(
            "the shape declares {count} elements but `data` holds {}",
            all.len()
        ));
    }
    let bad = |i: usize, v: &Value| format!("element {i} ({v}) is not a {datatype} value");
    macro_rules! convert {
        ($variant:ident, |$v:ident| $read:expr) => {
            TensorData::$variant(
                all.iter()
                    .enumerate()
                    .map(|(i, $v)| $read.ok_or_else(|| bad(i, $v)))
                    .collect::<Result<_, _>>()?,
            )
        };
    }
    // Integers must fit their type; floats must be finite in it (JSON has no NaN or infinity,
    // so a value past the range is a mistake, not an infinity).
    let float = |v: &Value, max: f64| v.as_f64().filter(|x| x.abs() <= max);
    Ok(match datatype {
        DataType::Bool => convert!(Bool, |v| v.as_bool()),
        DataType::U8 => convert!(U8, |v| v.as_u64().and_then(|x| x.try_into().ok())),
        DataType::U16 => convert!(U16, |v| v.as_u64().and_then(|x| x.try_into().ok())),
        DataType::U32 => convert!(U32, |v| v.as_u64().and_then(|x| x.try_into().ok())),
        DataType::U64 => convert!(U64, |v| v.as_u64()),
        DataType::I8 => convert!(I8, |v| v.as_i64().and_then(|x| x.try_into().ok())),
        DataType::I16 => convert!(I16, |v| v.as_i64().and_then(|x| x.try_into().ok())),
        DataType::I32 => convert!(I32, |v| v.as_i64().and_then(|x| x.try_into().ok())),
        DataType::I64 => convert!(I64, |v| v.as_i64()),
        DataType::F16 => convert!(F16, |v| float(v, f16::MAX.to_f64()).map(f16::from_f64)),
        DataType::Bf16 => convert!(Bf16, |v| float(v, bf16::MAX.to_f64()).map(bf16::from_f64)),
        DataType::F32 => convert!(F32, |v| float(v, f32::MAX as f64).map(|x| x as f32)),
        DataType::F64 => convert!(F64, |v| v.as_f64()),
        DataType::Bytes => convert!(Bytes, |v| v.as_str().map(|s| s.as_bytes().to_vec())),
    })
}

/// Little-endian binary data as `count` elements of `datatype`; BYTES elements each carry a
/// 4-byte length first.
fn from_binary(datatype: DataType, count: usize, bytes: &[u8]) -> Result<TensorData, String> {
    let Some(size) = datatype.element_size() else {
        return from_binary_strings(count, bytes);
    };
    if count.checked_mul(size) != Some(bytes.len()) {
        return Err(format!(
            "binary_data_size is {} bytes; the shape's {count} {datatype} elements take {}",
            bytes.len(),
            count.saturating_mul(size)
        ));
    }
    macro_rules! read {
        ($variant:ident, $t:ty) => {
            TensorData::$variant(
                bytes
                    .chunks_exact(size)
                    .map(|c| {
                        <$t>::from_le_bytes(c.try_into().expect("chunks have the element's size"))
                    })
                    .collect(),
            )
        };
    }
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        DataType::U8 => TensorData::U8(bytes.to_vec()),
        DataType::U16 => read!(U16, u16),
        DataType::U32 => read!(U32, u32),
        DataType::U64 => read!(U64, u64),
        DataType::I8 => read!(I8, i8),
        DataType::I16 => read!(I16, i16),
        DataType::I32 => read!(I32, i32),
        DataType::I64 => read!(I64, i64),
        DataType::F16 => read!(F16, f16),
        DataType::Bf16 => read!(Bf16, bf16),
        DataType::F32 => read!(F32, f32),
        DataType::F64 => read!(F64, f64),
        DataType::Bytes => unreachable!("BYTES has no element size"),
    })
}

fn from_binary_strings(count: usize, mut bytes: &[u8]) -> Result<TensorData, String> {
    let mut strings = Vec::new();
    while !bytes.is_empty() {
        let (length, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("a BYTES element's 4-byte length is cut short")?;
        let length = u32::from_le_bytes(*length) as usize;
        if length > rest.len() {
            return Err(format!(
                "BYTES element {} declares {length} bytes but only {} follow",
                strings.len(),
                rest.len()
            ));
        }
        let (element, rest) = rest.split_at(length);
        strings.push(element.to_vec());
        bytes = rest;
    }
    if strings.len() != count {
        return Err(format!(
            "the shape declares {count} elements but the binary data holds {}",
            strings.len()
        ));
    }
    Ok(TensorData::Bytes(strings))
}

fn write_binary(data: &TensorData, out: &mut Vec<u8>) {
    macro_rules! write {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::U8(v) => out.extend_from_slice(v),
        TensorData::U16(v) => write!(v),
        TensorData::U32(v) => write!(v),
        TensorData::U64(v) => write!(v),
        TensorData::I8(v) => write!(v),
        TensorData::I16(v) => write!(v),
        TensorData::I32(v) => write!(v),
        TensorData::I64(v) => write!(v),
        TensorData::F16(v) => write!(v),
        TensorData::Bf16(v) => write!(v),
        TensorData::F32(v) => write!(v),
        TensorData::F64(v) => write!(v),
        TensorData::Bytes(v) => {
            for s in v {
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s);
            }
        }
    }
}

/// Triton's classification extension: the top `k` scores of each row (the last dimension) as
/// BYTES "score:index", best first.
fn classify(tensor: &HostTensor, k: usize) -> Result<HostTensor, String> {
    // Each score as its own type prints it: 0.7 for an FP32 0.7, not 0.699999988079071.
    fn scored<T: Copy + std::fmt::Display>(v: &[T], f: impl Fn(T) -> f64) -> Vec<(f64, String)> {
        v.iter().map(|&x| (f(x), x.to_string())).collect()
    }
    let scores = match tensor.data() {
        TensorData::F16(v) => scored(v, f64::from),
        TensorData::Bf16(v) => scored(v, f64::from),
        TensorData::F32(v) => scored(v, f64::from),
        TensorData::F64(v) => scored(v, |x| x),
        TensorData::I64(v) => scored(v, |x| x as f64),
        TensorData::I32(v) => scored(v, f64::from),
        other => {
            return Err(format!(
                "classification takes scores, not {}",
                other.datatype()
            ))
        }
    };
    let classes = *tensor
        .shape()
        .last()
        .ok_or("classification needs a dimension of classes")?;
    if k > classes {
        return Err(format!(
            "classification asks for {k} classes; there are {classes}"
        ));
    }
    let mut labels = Vec::with_capacity(scores.len() / classes.max(1) * k);
    for row in scores.chunks(classes.max(1)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].0.total_cmp(&row[a].0));
        labels.extend(
            order[..k]
                .iter()
                .map(|&i| format!("{}:{i}", row[i].1).into_bytes()),
        );
    }
    let mut shape = tensor.shape().to_vec();
    *shape.last_mut().expect("checked above") = k;
    HostTensor::new(shape, TensorData::Bytes(labels))
}

/// Tensor data as a JSON array: half floats as numbers, BYTES as strings.
pub struct JsonData(TensorData);

impl Serialize for JsonData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            TensorData::Bool(v) => v.serialize(s),
            TensorData::U8(v) => v.serialize(s),
            TensorData::U16(v) => v.serialize(s),
            TensorData::U32(v) => v.serialize(s),
            TensorData::U64(v) => v.serialize(s),
            TensorData::I8(v) => v.serialize(s),
            TensorData::I16(v) => v.serialize(s),
            TensorData::I32(v) => v.serialize(s),
            TensorData::I64(v) => v.serialize(s),
            TensorData::F16(v) => s.collect_seq(v.iter().map(|x| x.to_f32())),
            TensorData::Bf16(v) => s.collect_seq(v.iter().map(|x| x.to_f32())),
            TensorData::F32(v) => v.serialize(s),
            TensorData::F64(v) => v.serialize(s),
            TensorData::Bytes(v) => s.collect_seq(v.iter().map(|b| String::from_utf8_lossy(b))),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// One buffer of each datatype, with the extremes of its range.
    fn samples() -> Vec<TensorData> {
        vec![
            TensorData::Bool(vec![true, false, true]),
            TensorData::U8(vec![0, 7, u8::MAX]),
            TensorData::U16(vec![0, 7, u16::MAX]),
            TensorData::U32(vec![0, 7, u32::MAX]),
            TensorData::U64(vec![0, 7, u64::MAX]),
            TensorData::I8(vec![i8::MIN, -1, i8::MAX]),
            TensorData::I16(vec![i16::MIN, -1, i16::MAX]),
            TensorData::I32(vec![i32::MIN, -1, i32::MAX]),
            TensorData::I64(vec![i64::MIN, -1, i64::MAX]),
            TensorData::F16(vec![f16::MIN, f16::from_f32(-0.5), f16::MAX]),
            TensorData::Bf16(vec![bf16::MIN, bf16::from_f32(0.25), bf16::MAX]),
            TensorData::F32(vec![f32::MIN, 1.5e-7, f32::MAX]),
            TensorData::F64(vec![f64::MIN, -0.0, f64::MAX]),
            TensorData::Bytes(vec![b"".to_vec(), "é✓".as_bytes().to_vec(), vec![0, 255]]),
        ]
    }

    #[test]
    fn every_datatype_survives_binary_and_json() {
        for data in samples() {
            let datatype = data.datatype();
            let mut bytes = Vec::new();
            write_binary(&data, &mut bytes);
            assert_eq!(
                from_binary(datatype, 3, &bytes).unwrap(),
                data,
                "{datatype} binary"
            );
            // JSON carries BYTES as text, so only valid UTF-8 would come back whole.
            if datatype != DataType::Bytes {
                let json = serde_json::to_value(JsonData(data.clone())).unwrap();
                assert_eq!(
                    from_json(datatype, 3, &json).unwrap(),
                    data,
                    "{datatype} JSON"
                );
            }
        }
    }

    #[test]
    fn json_values_must_fit_their_type() {
        let cases = [
            (
                DataType::I8,
                json!([300]),
                "element 0 (300) is not a INT8 value",
            ),
            (
                DataType::U8,
                json!([-1]),
                "element 0 (-1) is not a UINT8 value",
            ),
            (DataType::I64, json!([1.5]), "(1.5) is not a INT64"),
            (DataType::F16, json!([70000.0]), "(70000.0) is not a FP16"),
            (DataType::F32, json!([1e39]), "is not a FP32"),
            (DataType::Bool, json!([1]), "(1) is not a BOOL"),
            (DataType::Bytes, json!([1]), "(1) is not a BYTES"),
        ];
        for (datatype, data, expected) in cases {
            let err = from_json(datatype, 1, &data).unwrap_err();
            assert!(err.contains(expected), "{datatype}: {err}");
        }
        let err = from_json(DataType::F32, 2, &json!([[1.0], [2.0, 3.0]])).unwrap_err();
        assert!(
            err.contains("declares 2 elements but `data` holds 3"),
            "{err}"
        );
    }

    proptest! {
        /// Nested and flat JSON give the same row-major elements.
        #[test]
        fn nesting_does_not_change_the_elements(values in prop::collection::vec(-1e6f32..1e6, 1..40), width in 1usize..5) {
            let flat = Value::from(values.iter().map(|&v| v as f64).collect::<Vec<_>>());
            let nested = Value::from(values.chunks(width).map(|c| Value::from(c.iter().map(|&v| v as f64).collect::<Vec<_>>())).collect::<Vec<_>>());
            let a = from_json(DataType::F32, values.len(), &flat).unwrap();
            prop_assert_eq!(&a, &from_json(DataType::F32, values.len(), &nested).unwrap());
            prop_assert_eq!(a, TensorData::F32(values));
        }

        /// Binary BYTES elements are length-prefixed; a cut anywhere is refused, never a panic.
        #[test]
        fn cut_binary_strings_are_refused(strings in prop::collection::vec(".{0,8}", 1..6), cut in 1usize..8) {
            let data = TensorData::Bytes(strings.iter().map(|s| s.as_bytes().to_vec()).collect());
            let mut bytes = Vec::new();
            write_binary(&data, &mut bytes);
            prop_assert_eq!(from_binary(DataType::Bytes, strings.len(), &bytes).unwrap(), data);
            let cut = cut.min(bytes.len());
            prop_assert!(from_binary(DataType::Bytes, strings.len(), &bytes[..bytes.len() - cut]).is_err());
        }
    }

    #[test]
    fn classification_gives_the_top_scores_best_first() {
        let scores = HostTensor::new(
            vec![2, 3],
            TensorData::F32(vec![0.1, 0.7, 0.2, 0.5, 0.25, 0.25]),
        )
        .unwrap();
        let top = classify(&scores, 2).unwrap();
        assert_eq!(top.shape(), &[2, 2]);
        let labels: Vec<String> = match top.data() {
            TensorData::Bytes(v) => v
                .iter()
                .map(|b| String::from_utf8(b.clone()).unwrap())
                .collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(labels, ["0.7:1", "0.2:2", "0.5:0", "0.25:1"]);
        assert!(classify(&scores, 4).unwrap_err().contains("there are 3"));
    }

    #[test]
    fn the_header_length_must_fit_the_body() {
        let body = Bytes::from_static(b"{}rest");
        for bad in ["7", "-1", "two"] {
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_LENGTH, HeaderValue::from_static(bad));
            let err = split_body(&headers, &body).unwrap_err();
            assert!(
                err.message.contains("Inference-Header-Content-Length"),
                "{}",
                err.message
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("2"));
        assert_eq!(
            split_body(&headers, &body).unwrap(),
            (&b"{}"[..], &b"rest"[..])
        );
    }
}

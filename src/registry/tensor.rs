//! Request-level logic of a tensor model: check the request's tensors against the signature, cut
//! them into rows the batcher stacks with other requests' rows, and stack the outputs back.

use super::ModelError;
use crate::batching::Batcher;
use crate::engine::tensor::onnx::{OnnxEngine, TensorInfo};
use crate::engine::tensor::signature::{Signature, TensorSpec};
use crate::engine::tensor::HostTensor;
use crate::engine::EngineError;
use crate::metrics::BatcherMetrics;
use crate::repository::ModelSpec;

pub struct TensorModel {
    spec: ModelSpec,
    info: TensorInfo,
    signature: Signature,
    batcher: Batcher<OnnxEngine>,
}

impl TensorModel {
    /// Starts the batcher for a loaded graph; needs a tokio runtime.
    pub fn start(
        spec: ModelSpec,
        engine: OnnxEngine,
        info: TensorInfo,
        metrics: BatcherMetrics,
    ) -> Result<Self, EngineError> {
        let signature = engine.signature().clone();
        let batcher = super::start_batcher(&spec, engine, metrics)?;
        Ok(Self {
            spec,
            info,
            signature,
            batcher,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn info(&self) -> &TensorInfo {
        &self.info
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    pub fn expected_wait(&self) -> std::time::Duration {
        self.batcher.expected_wait()
    }

    /// Rows (dimension 0) a request holds, from its first tensor: what counts against the
    /// batch size. A model that is not batched takes one request as one item.
    pub fn rows(&self, first: Option<&HostTensor>) -> usize {
        match (self.signature.batched, first) {
            (true, Some(t)) => t.rows(),
            _ => 1,
        }
    }

    /// Runs the named tensors; returns every output, in signature order, with the request's
    /// rows. Rows of a batched model are queued one by one, so they share forward passes with
    /// other requests' rows and count one each against `max_batch_size`.
    pub async fn infer(
        &self,
        inputs: Vec<(String, HostTensor)>,
    ) -> Result<Vec<HostTensor>, ModelError> {
        let inputs = self.arrange(inputs)?;
        let items: Vec<(Vec<HostTensor>, usize)> = if self.signature.batched {
            (0..self.rows(inputs.first()))
                .map(|r| (inputs.iter().map(|t| t.rows_range(r, 1)).collect(), 1))
                .collect()
        } else {
            vec![(inputs, 1)]
        };
        let replies = self.batcher.submit(items)?;
        let mut parts = Vec::with_capacity(replies.len());
        for reply in replies {
            parts.push(reply.await.map_err(|_| {
                ModelError::Internal("the model's compute thread stopped".into())
            })??);
        }
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        (0..self.signature.outputs.len())
            .map(|j| {
                let rows: Vec<&HostTensor> = parts.iter().map(|p| &p[j]).collect();
                HostTensor::concat_rows(&rows).map_err(ModelError::Internal)
            })
            .collect()
    }

    /// The request's tensors in signature order, each checked: present once, of the input's
    /// datatype and shape, all with the same rows, finite where the model asks for it.
    fn arrange(&self, mut given: Vec<(String, HostTensor)>) -> Result<Vec<HostTensor>, ModelError> {
        let invalid = |message: String| ModelError::InvalidInput {
            index: None,
            message,
        };
        let names = || list_names(&self.signature.inputs);
        for (i, (name, _)) in given.iter().enumerate() {
            if given[..i].iter().any(|(n, _)| n == name) {
                return Err(invalid(format!("input {name:?} is given twice")));
            }
            if !self.signature.inputs.iter().any(|s| &s.name == name) {
                return Err(invalid(format!(
                    "unknown input {name:?}; this model's inputs are {}",
                    names()
                )));
            }
        }
        let mut arranged = Vec::with_capacity(self.signature.inputs.len());
        for spec in &self.signature.inputs {
            let Some(at) = given.iter().position(|(n, _)| n == &spec.name) else {
                return Err(invalid(format!(
                    "input {:?} is missing; this model's inputs are {}",
                    spec.name,
                    names()
                )));
            };
            let (_, tensor) = given.swap_remove(at);
            check(spec, &tensor, self.spec.tensor.allow_non_finite)
                .map_err(|problem| invalid(format!("input {:?}: {problem}", spec.name)))?;
            arranged.push(tensor);
        }
        if self.signature.batched {
            let rows = arranged[0].rows();
            if let Some((spec, t)) = self
                .signature
                .inputs
                .iter()
                .zip(&arranged)
                .find(|(_, t)| t.rows() != rows)
            {
                return Err(invalid(format!(
                    "inputs disagree on dimension 0, the batch: {:?} has {rows} rows, {:?} has {}",
                    self.signature.inputs[0].name,
                    spec.name,
                    t.rows()
                )));
            }
        }
        Ok(arranged)
    }
}

/// What is wrong with one input tensor, if anything.
fn check(spec: &TensorSpec, tensor: &HostTensor, allow_non_finite: bool) -> Result<(), String> {
    if tensor.datatype() != spec.datatype {
        return Err(format!(
            "datatype {} does not match; this input takes {}",
            tensor.datatype(),
            spec.datatype
        ));
    }
    let shape = tensor.shape();
    if shape.len() != spec.shape.len() {
        return Err(format!(
            "shape {shape:?} has {} dimensions; this input's shape is {:?}",
            shape.len(),
            spec.shape
        ));
    }
    if let Some(i) =
        (0..shape.len()).find(|&i| spec.shape[i] != -1 && spec.shape[i] != shape[i] as i64)
    {
        return Err(format!(
            "dimension {i} is {} in shape {shape:?}; this input's shape is {:?}",
            shape[i], spec.shape
        ));
    }
    if let Some(i) = shape.iter().position(|&d| d == 0) {
        return Err(format!(
            "dimension {i} of shape {shape:?} is 0; send at least one element"
        ));
    }
    if !allow_non_finite {
        if let Some((index, value)) = tensor.data().first_non_finite() {
            return Err(format!(
                "element {index} is {value}; this model takes no NaN or infinite values \
                 (`tensor.allow_non_finite` in its model.toml)"
            ));
        }
    }
    Ok(())
}

fn list_names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("{:?}", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

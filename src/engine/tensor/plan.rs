//! How a graph runs: its nodes cut into steps, each Conv that Ember's own kernel covers on its
//! own and every run of other nodes as a small graph candle-onnx evaluates.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_onnx::onnx;

use super::conv::Conv2d;

/// A run of nodes evaluated together.
pub(super) enum Step {
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

/// Cuts the graph's nodes into steps: each Conv that [`Conv2d`] covers runs on its own, every
/// run of other nodes as a graph candle-onnx evaluates, handed the values it reads and giving
/// back the values later steps (or the outputs) read. A graph with subgraphs (`If`) stays one
/// step: its branches read values from the enclosing scope.
pub(super) fn steps(mut model: onnx::ModelProto, weights: &HashMap<String, Tensor>) -> Vec<Step> {
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

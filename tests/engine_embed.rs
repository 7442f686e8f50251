//! The encoder alone, on the real all-MiniLM-L6-v2: a text inside a padded batch gives the same
//! vector as alone, whatever it is padded against.

mod common;

use candle_core::Device;
use common::*;
use ember::repository::{EmbedOptions, Precision};

#[test]
fn padding_does_not_change_a_vector() {
    let dir = minilm_weights();
    let (mut embedder, tokenizer) =
        ember::engine::embed::load(&dir, &EmbedOptions::default(), &Device::Cpu).unwrap();
    let cases = reference_cases();
    let short = tokenizer
        .encode("Padding must not change the answer.")
        .unwrap()
        .ids;
    let long = tokenizer
        .encode(&cases.iter().find(|c| c.truncated).unwrap().text)
        .unwrap()
        .ids;
    assert_eq!(long.len(), 256);
    let alone = embedder.embed(std::slice::from_ref(&short)).unwrap();
    let padded = embedder
        .embed(&[long.clone(), short.clone(), long[..40].to_vec()])
        .unwrap();
    let cos = cosine(&alone[0], &padded[1]);
    assert!(cos >= 0.99999, "cosine {cos}");
    // And the long one matches the reference, wherever it stands in the batch.
    let reference = &cases.iter().find(|c| c.truncated).unwrap().embedding;
    assert!(cosine(&padded[0], reference) >= 0.9999);
}

/// Both arithmetic paths of the dense layers meet the reference bar on every case, one by one
/// and in one padded batch (bf16 runs whichever kernel this CPU has: AMX, AVX-512 BF16, AVX2 or
/// portable).
#[test]
fn f32_and_bf16_both_match_the_reference() {
    let dir = minilm_weights();
    let cases = reference_cases();
    for precision in [Precision::F32, Precision::Bf16] {
        let options = EmbedOptions {
            precision,
            ..EmbedOptions::default()
        };
        let (mut embedder, tokenizer) =
            ember::engine::embed::load(&dir, &options, &Device::Cpu).unwrap();
        assert_eq!(embedder.info().precision, precision);
        let ids: Vec<Vec<u32>> = cases
            .iter()
            .map(|c| tokenizer.encode(&c.text).unwrap().ids)
            .collect();
        let batched = embedder.embed(&ids).unwrap();
        let mut worst = f64::MAX;
        for ((case, ids), in_batch) in cases.iter().zip(&ids).zip(&batched) {
            let alone = &embedder.embed(std::slice::from_ref(ids)).unwrap()[0];
            for got in [alone, in_batch] {
                let cos = cosine(got, &case.embedding);
                worst = worst.min(cos);
                assert!(
                    cos >= 0.9999,
                    "{precision:?}: cosine {cos} for {:?}",
                    case.text
                );
            }
        }
        eprintln!("{precision:?}: worst cosine against the reference {worst:.7}");
    }
}

//! The encoder alone, on the real all-MiniLM-L6-v2: a text inside a padded batch gives the same
//! vector as alone, whatever it is padded against.

mod common;

use candle_core::Device;
use common::*;
use ember::repository::EmbedOptions;

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

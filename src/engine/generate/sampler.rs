//! Picking the next token from logits: penalties, temperature, top-k, top-p, and a seeded
//! generator per sequence so that a seed reproduces a sample whatever else is running.

use std::collections::HashMap;

/// How one request samples. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// HF/llama.cpp-style: logits of tokens already in the prompt or output are divided by it
    /// (multiplied when negative). 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI-style, over generated tokens: minus `presence` once a token appeared, minus
    /// `frequency` per time it appeared.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// SplitMix64: small, fast, and the same on every platform, which is what a seed promises.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Tokens of the prompt (for the repetition penalty).
    seen_in_prompt: Vec<u32>,
    /// Generated tokens and how often each appeared.
    generated: HashMap<u32, u32>,
}

/// Candidates kept before sorting when only top-p is asked for; the full sort happens only if
/// their mass falls short of `top_p`.
const TOP_P_FIRST_CUT: usize = 256;

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::time::SystemTime::now())
        });
        let mut seen_in_prompt = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        seen_in_prompt.sort_unstable();
        seen_in_prompt.dedup();
        Self {
            params,
            rng: Rng(seed),
            seen_in_prompt,
            generated: HashMap::new(),
        }
    }

    /// Records a token the sequence produced (it counts for the penalties from now on).
    pub fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
    }

    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.penalise(logits);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let mut pool: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = self.params.top_k.filter(|&k| k > 0 && k < pool.len()) {
            pool.select_nth_unstable_by(k - 1, by_logit);
            pool.truncate(k);
        }
        let max = pool.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        for c in &mut pool {
            c.1 = (c.1 - max).exp();
        }
        let total: f32 = pool.iter().map(|c| c.1).sum();
        if self.params.top_p < 1.0 {
            let goal = self.params.top_p * total;
            // Sort only the most likely few first; sort all only if they fall short of top_p.
            let mut cut = TOP_P_FIRST_CUT.min(pool.len());
            loop {
                if cut < pool.len() {
                    pool.select_nth_unstable_by(cut - 1, by_logit);
                }
                pool[..cut].sort_unstable_by(by_logit);
                let mut mass = 0.0;
                let end = pool[..cut].iter().position(|c| {
                    mass += c.1;
                    mass >= goal
                });
                if let Some(end) = end {
                    pool.truncate(end + 1);
                    break;
                }
                if cut == pool.len() {
                    break;
                }
                cut = pool.len();
            }
        }
        let mass: f32 = pool.iter().map(|c| c.1).sum();
        let mut r = self.rng.next_f32() * mass;
        for c in &pool {
            r -= c.1;
            if r < 0.0 {
                return c.0;
            }
        }
        pool.last().map_or_else(|| argmax(logits), |c| c.0)
    }

    fn penalise(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let seen = self.seen_in_prompt.iter().chain(
                self.generated
                    .keys()
                    .filter(|t| self.seen_in_prompt.binary_search(t).is_err()),
            );
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &count) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }
}

/// The most likely token; the lowest id wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            &[],
        );
        let mut l = logits();
        let want = argmax(&l);
        assert_eq!(s.sample(&mut l), want);
    }

    #[test]
    fn a_seed_reproduces_and_top_k_bounds_the_choice() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: Some(5),
            seed: Some(42),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..50).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let mut top: Vec<(usize, f32)> = logits().into_iter().enumerate().collect();
        top.sort_by(|x, y| y.1.total_cmp(&x.1));
        let top5: Vec<u32> = top[..5].iter().map(|t| t.0 as u32).collect();
        assert!(a.iter().all(|t| top5.contains(t)), "{a:?} outside {top5:?}");
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds ~88% of the mass: top_p 0.5 must always pick it.
        let mut l = vec![0.0f32; 100];
        l[17] = 10.0;
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                seed: Some(1),
                ..Default::default()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut l.clone()), 17);
        }
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..Default::default()
            },
            &[3],
        );
        let mut l = vec![0.0, 1.0, 0.0, 1.5];
        assert_eq!(
            s.sample(&mut l),
            1,
            "token 3 is in the prompt: 1.5 / 2 < 1.0"
        );
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                frequency_penalty: 0.4,
                ..Default::default()
            },
            &[],
        );
        s.record(1);
        s.record(1);
        assert_eq!(s.sample(&mut [0.0, 1.0, 0.5]), 2, "1.0 - 0.8 < 0.5");
    }
}

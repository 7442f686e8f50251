//! Continuous batching for generation. One OS thread owns the decoder and every running
//! sequence. Each step it drops sequences whose client left, admits waiting requests while the
//! sequence and KV-token budgets allow, and runs **one** forward pass over a chunk from every
//! sequence: the next token of each decoding one and a bounded slice of prompt from prefilling
//! ones. Sequences leave the moment they finish, stop or are cancelled; new ones join between steps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::{BatchError, QueueWait};
use crate::engine::generate::{Chunk, Sampler, SamplingParams, TextStream};
use crate::metrics::GenerateMetrics;
use crate::repository::GeneratePolicy;

/// What the scheduler needs from a model: caches, one batched forward pass, and its vocabulary.
pub trait Decoder: Send + 'static {
    type Cache: Send;
    fn new_cache(&self, capacity: usize) -> Result<Self::Cache, String>;
    /// Appends each chunk's tokens to its cache; one logits row per chunk that asks for them.
    fn forward(&self, chunks: &mut [Chunk<'_, Self::Cache>]) -> Result<Vec<Vec<f32>>, String>;
    /// Makes `to` (a fresh cache) hold the first `len` positions of `from`.
    fn copy_prefix(
        &self,
        from: &Self::Cache,
        to: &mut Self::Cache,
        len: usize,
    ) -> Result<(), String>;
    /// Bytes a token adds to the generated text.
    fn piece(&self, token: u32) -> &[u8];
    fn is_end_of_generation(&self, token: u32) -> bool;
}

/// One generation request, already tokenised and validated.
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

impl GenerationRequest {
    /// KV-cache tokens the request holds while it runs: its prompt and all it may generate.
    fn reserve(&self) -> usize {
        self.prompt.len() + self.max_tokens
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// The name both APIs use (OpenAI's `finish_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (never empty), and the tokens produced since the last event.
    Text {
        text: String,
        tokens: usize,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose KV cache came from the prefix cache instead of being computed
        /// (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// The submitting side; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    model: String,
    tx: mpsc::Sender<GenerationRequest>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    wait: QueueWait,
}

impl Scheduler {
    pub fn spawn<D: Decoder>(
        model: &str,
        decoder: D,
        policy: GeneratePolicy,
        metrics: GenerateMetrics,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let wait = QueueWait::default();
        let worker = Worker {
            decoder,
            policy,
            metrics,
            rx,
            waiting: waiting.clone(),
            wait: wait.clone(),
            queue: VecDeque::new(),
            running: Vec::new(),
            retained: VecDeque::new(),
            reserved: 0,
        };
        std::thread::Builder::new()
            .name(format!("ember-generate-{model}"))
            .spawn(move || worker.run())?;
        Ok(Self {
            model: model.to_string(),
            tx,
            waiting,
            max_waiting: policy.max_waiting,
            wait,
        })
    }

    /// How long a request submitted now would likely wait for admission.
    pub fn expected_wait(&self) -> std::time::Duration {
        self.wait.expected(self.waiting.load(Ordering::SeqCst))
    }

    /// Queues a request; answers at once when too many are already waiting.
    pub fn submit(&self, request: GenerationRequest) -> Result<(), BatchError> {
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(BatchError::QueueFull {
                model: self.model.clone(),
                capacity: self.max_waiting,
            });
        }
        self.tx.send(request).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            BatchError::Stopped(self.model.clone())
        })
    }
}

struct Sequence<C> {
    request: GenerationRequest,
    cache: C,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Of those, the ones copied from the prefix cache at admission.
    cached: usize,
    /// The token to feed next once prefill is done.
    next: Option<u32>,
    generated: usize,
    sampler: Sampler,
    text: TextStream,
    first_token_at: Option<Instant>,
    /// Tokens produced since the last text event.
    unsent_tokens: usize,
}

/// A finished prompt and its KV cache, compacted to the prompt's positions (the prefix cache).
struct Retained<C> {
    prompt: Vec<u32>,
    cache: C,
}

/// Shortest prompt prefix worth copying from the prefix cache.
const MIN_PREFIX: usize = 4;

struct Worker<D: Decoder> {
    decoder: D,
    policy: GeneratePolicy,
    metrics: GenerateMetrics,
    rx: mpsc::Receiver<GenerationRequest>,
    waiting: Arc<AtomicUsize>,
    wait: QueueWait,
    queue: VecDeque<GenerationRequest>,
    running: Vec<Sequence<D::Cache>>,
    /// The prefix cache, most recently used first.
    retained: VecDeque<Retained<D::Cache>>,
    /// KV tokens reserved by running sequences and retained prompts.
    reserved: usize,
}

impl<D: Decoder> Worker<D> {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.queue.is_empty() {
                // Idle: say so, then sleep until a request comes; every sender gone means
                // shutdown.
                self.publish_gauges();
                match self.rx.recv() {
                    Ok(r) => self.queue.push_back(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = self.rx.try_recv() {
                self.queue.push_back(r);
            }
            self.drop_cancelled();
            self.admit();
            self.publish_gauges();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|r| !r.events.is_closed());
        let gone_waiting = before - self.queue.len();
        self.waiting.fetch_sub(gone_waiting, Ordering::SeqCst);
        let before = self.running.len();
        let mut freed = 0;
        self.running.retain(|s| {
            let keep = !s.request.events.is_closed();
            if !keep {
                freed += s.request.reserve();
            }
            keep
        });
        self.reserved -= freed;
        let cancelled = gone_waiting + before - self.running.len();
        self.metrics
            .batch
            .cancelled_items_total
            .inc_by(cancelled as u64);
    }

    /// First come, first admitted: the head of the queue waits for room rather than being
    /// overtaken, so a large request cannot starve.
    fn admit(&mut self) {
        while self.running.len() < self.policy.max_concurrent_sequences {
            let Some(head) = self.queue.front() else {
                break;
            };
            let reserve = head.reserve();
            // Retained prompts give way to new requests.
            while self.reserved + reserve > self.policy.max_total_tokens && self.evict_oldest() {}
            if self.reserved + reserve > self.policy.max_total_tokens && !self.running.is_empty() {
                break;
            }
            let request = self.queue.pop_front().expect("front exists");
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let waited = request.arrived.elapsed();
            self.metrics
                .batch
                .queue_duration_seconds
                .observe(waited.as_secs_f64());
            self.wait.observe(waited);
            let mut cache = match self.decoder.new_cache(reserve) {
                Ok(c) => c,
                Err(e) => {
                    let _ = request.events.send(Event::Failed(e));
                    continue;
                }
            };
            let prefilled = self.reuse_prefix(&request.prompt, &mut cache);
            self.metrics
                .prompt_cached_tokens_total
                .inc_by(prefilled as u64);
            self.reserved += reserve;
            let sampler = Sampler::new(request.sampling.clone(), &request.prompt);
            let text = TextStream::new(request.stop.clone());
            self.running.push(Sequence {
                request,
                cache,
                prefilled,
                cached: prefilled,
                next: None,
                generated: 0,
                sampler,
                text,
                first_token_at: None,
                unsent_tokens: 0,
            });
        }
    }

    /// Copies into `cache` the longest start of `prompt` that the prefix cache holds; returns
    /// how many positions it copied. At least two prompt tokens are left to compute, so that the
    /// rest of the prompt runs in the prompt order (`prompt_take`) and the sequence's numbers
    /// are those of the prompt run in one pass.
    fn reuse_prefix(&mut self, prompt: &[u32], cache: &mut D::Cache) -> usize {
        let common = |r: &Retained<D::Cache>| {
            r.prompt
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        // The longest match; the most recently used among equals.
        let best = self
            .retained
            .iter()
            .enumerate()
            .map(|(i, r)| (common(r), i))
            .min_by_key(|&(len, i)| (std::cmp::Reverse(len), i));
        let Some((len, i)) = best else {
            return 0;
        };
        let len = len.min(prompt.len().saturating_sub(2));
        if len < MIN_PREFIX
            || self
                .decoder
                .copy_prefix(&self.retained[i].cache, cache, len)
                .is_err()
        {
            return 0;
        }
        let entry = self.retained.remove(i).expect("index from the search");
        self.retained.push_front(entry);
        len
    }

    /// Keeps a finished sequence's prompt and its part of the cache in the prefix cache. Every
    /// prompt position was computed in the prompt order (`prompt_take`), so a later prompt that
    /// copies them gets the numbers a pass over its whole prompt would give. Generated positions
    /// ran in the decode order and are not kept.
    fn retain(&mut self, s: Sequence<D::Cache>) {
        let n = s.request.prompt.len();
        let entries = self.policy.prefix_cache_entries;
        if entries == 0 || self.policy.prefill_chunk < 2 || n < MIN_PREFIX + 2 || s.prefilled < n {
            return;
        }
        // An entry that this prompt extends or repeats has nothing left to offer.
        let mut freed = 0;
        self.retained.retain(|r| {
            let keep = !s.request.prompt.starts_with(&r.prompt);
            if !keep {
                freed += r.prompt.len();
            }
            keep
        });
        self.reserved -= freed;
        while (self.retained.len() >= entries || self.reserved + n > self.policy.max_total_tokens)
            && self.evict_oldest()
        {}
        if self.reserved + n > self.policy.max_total_tokens {
            return;
        }
        let Ok(mut cache) = self.decoder.new_cache(n) else {
            return;
        };
        if self.decoder.copy_prefix(&s.cache, &mut cache, n).is_ok() {
            self.reserved += n;
            self.retained.push_front(Retained {
                prompt: s.request.prompt,
                cache,
            });
        }
    }

    /// Drops the least recently used retained prompt; false when none is left.
    fn evict_oldest(&mut self) -> bool {
        let Some(old) = self.retained.pop_back() else {
            return false;
        };
        self.reserved -= old.prompt.len();
        true
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.batch.queue_depth_items.set(self.queue.len() as i64);
        m.running_sequences.set(self.running.len() as i64);
        m.kv_cache_tokens.set(self.reserved as i64);
        m.kv_cache_usage_ratio
            .set(self.reserved as f64 / self.policy.max_total_tokens as f64);
    }

    fn step(&mut self) {
        let started = Instant::now();
        // Prompt tokens this step may take, shared first come first served.
        let mut prefill_budget = self.policy.prefill_chunk;
        // (sequence, tokens taken, logits wanted) for every sequence in this step.
        let mut plan: Vec<(usize, usize, bool)> = Vec::with_capacity(self.running.len());
        let outcome = {
            let mut chunks = Vec::with_capacity(self.running.len());
            for (i, s) in self.running.iter_mut().enumerate() {
                let (tokens, logits): (&[u32], bool) = match &s.next {
                    Some(t) => (std::slice::from_ref(t), true),
                    None if prefill_budget > 0 => {
                        let left = s.request.prompt.len() - s.prefilled;
                        let take = prompt_take(left, prefill_budget, self.policy.prefill_chunk);
                        if take == 0 {
                            continue;
                        }
                        prefill_budget = prefill_budget.saturating_sub(take);
                        let slice = &s.request.prompt[s.prefilled..s.prefilled + take];
                        (slice, take == left)
                    }
                    None => continue,
                };
                plan.push((i, tokens.len(), logits));
                chunks.push(Chunk {
                    tokens,
                    cache: &mut s.cache,
                    logits,
                });
            }
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.decoder.forward(&mut chunks)
            }))
            .unwrap_or_else(|_| Err("the forward pass panicked".into()))
        };
        let m = &self.metrics;
        m.batch
            .inference_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        m.batch.batch_size_items.observe(plan.len() as f64);
        let tokens: usize = plan.iter().map(|p| p.1).sum();
        m.batch.batch_size_tokens.observe(tokens as f64);
        let logits = match outcome {
            Ok(l) => l,
            Err(e) => {
                // A failed pass leaves the caches of everyone in it undefined: fail them all.
                tracing::error!(error = %e, "generation step failed");
                for s in self.running.drain(..) {
                    let _ = s.request.events.send(Event::Failed(e.clone()));
                }
                self.retained.clear();
                self.reserved = 0;
                return;
            }
        };
        let mut logits = logits.into_iter();
        let mut finished = Vec::new();
        for &(i, take, want_logits) in &plan {
            let s = &mut self.running[i];
            if s.next.is_none() {
                s.prefilled += take;
                self.metrics.prompt_tokens_total.inc_by(take as u64);
            }
            if !want_logits {
                continue;
            }
            let Some(mut row) = logits.next() else {
                finished.push(i);
                let _ = s
                    .request
                    .events
                    .send(Event::Failed("the model returned no logits".into()));
                continue;
            };
            let token = s.sampler.sample(&mut row);
            if let Some(reason) = Self::accept(&self.decoder, &self.metrics, s, token) {
                Self::finish(&self.metrics, s, reason);
                finished.push(i);
            }
        }
        // Descending, so earlier indices stay valid; `remove` keeps admission order.
        for i in finished.into_iter().rev() {
            let s = self.running.remove(i);
            self.reserved -= s.request.reserve();
            self.retain(s);
        }
    }

    /// Takes a sampled token into the sequence; returns why it ends, if it does.
    fn accept(
        decoder: &D,
        metrics: &GenerateMetrics,
        s: &mut Sequence<D::Cache>,
        token: u32,
    ) -> Option<FinishReason> {
        let now = Instant::now();
        if s.first_token_at.is_none() {
            s.first_token_at = Some(now);
            metrics
                .time_to_first_token_seconds
                .observe((now - s.request.arrived).as_secs_f64());
        }
        s.generated += 1;
        s.unsent_tokens += 1;
        metrics.generated_tokens_total.inc();
        if decoder.is_end_of_generation(token) {
            return Some(FinishReason::Stop);
        }
        s.sampler.record(token);
        s.next = Some(token);
        let step = s.text.push(decoder.piece(token));
        if !step.text.is_empty() {
            let tokens = std::mem::take(&mut s.unsent_tokens);
            let _ = s.request.events.send(Event::Text {
                text: step.text,
                tokens,
            });
        }
        if step.stopped {
            return Some(FinishReason::Stop);
        }
        (s.generated >= s.request.max_tokens).then_some(FinishReason::Length)
    }

    fn finish(metrics: &GenerateMetrics, s: &mut Sequence<D::Cache>, finish: FinishReason) {
        // Text held back as a possible stop string is final now (empty after a stop string).
        let rest = s.text.finish();
        if !rest.is_empty() {
            let tokens = std::mem::take(&mut s.unsent_tokens);
            let _ = s.request.events.send(Event::Text { text: rest, tokens });
        }
        let now = Instant::now();
        metrics
            .generation_duration_seconds
            .observe((now - s.request.arrived).as_secs_f64());
        if let (Some(first), true) = (s.first_token_at, s.generated > 1) {
            metrics
                .time_per_output_token_seconds
                .observe((now - first).as_secs_f64() / (s.generated - 1) as f64);
        }
        let _ = s.request.events.send(Event::Done {
            finish,
            prompt_tokens: s.request.prompt.len(),
            cached_tokens: s.cached,
            completion_tokens: s.generated,
        });
    }
}

/// Prompt tokens a prefilling sequence takes this step, out of `left`, with `budget` of the
/// step's prefill chunk still free. A slice of one token runs attention in the decode order
/// (llama.cpp's `ggml_vec_dot_f16`), the rest of a prompt in the prompt order (tinyBLAS), and
/// llama.cpp processes a whole prompt in the prompt order; so unless the chunk itself is one
/// token, no slice of a longer prompt is one token long, and a prompt's tokens compute exactly
/// as in one pass. The last lone token rides along (one over the budget), and a sequence that
/// would get one token waits a step; the first in line always gets the whole chunk, so every
/// prompt progresses.
fn prompt_take(left: usize, budget: usize, chunk: usize) -> usize {
    let take = left.min(budget);
    if chunk < 2 || left == 1 {
        return take;
    }
    match left - take {
        1 => left,
        _ if take == 1 => 0,
        _ => take,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    const VOCAB: usize = 50;
    const EOG: u32 = 49;

    /// Next token = sum of the sequence's tokens so far mod 48 (never EOG unless the prompt asks
    /// for it with a 0 at the end), so any mix-up of caches between sequences changes outputs.
    /// Records each step's chunk sizes.
    #[derive(Clone, Default)]
    struct Fake {
        steps: Arc<Mutex<Vec<Vec<usize>>>>,
    }

    impl Decoder for Fake {
        type Cache = Vec<u32>;

        fn new_cache(&self, capacity: usize) -> Result<Vec<u32>, String> {
            Ok(Vec::with_capacity(capacity))
        }

        fn forward(&self, chunks: &mut [Chunk<'_, Vec<u32>>]) -> Result<Vec<Vec<f32>>, String> {
            // Slow enough that a long generation is still running when a test looks.
            std::thread::sleep(Duration::from_micros(100));
            self.steps
                .lock()
                .unwrap()
                .push(chunks.iter().map(|c| c.tokens.len()).collect());
            let mut out = Vec::new();
            for c in chunks.iter_mut() {
                assert!(
                    c.cache.len() + c.tokens.len() <= c.cache.capacity(),
                    "over budget"
                );
                c.cache.extend_from_slice(c.tokens);
                if c.logits {
                    let next = if c.cache.last() == Some(&0) {
                        EOG
                    } else {
                        (c.cache.iter().map(|&t| t as usize).sum::<usize>() % 48) as u32 + 1
                    };
                    let mut logits = vec![0.0; VOCAB];
                    logits[next as usize] = 1.0;
                    out.push(logits);
                }
            }
            Ok(out)
        }

        fn copy_prefix(
            &self,
            from: &Vec<u32>,
            to: &mut Vec<u32>,
            len: usize,
        ) -> Result<(), String> {
            if len > from.len() || len > to.capacity() {
                return Err("prefix out of range".into());
            }
            to.clear();
            to.extend_from_slice(&from[..len]);
            Ok(())
        }

        fn piece(&self, token: u32) -> &[u8] {
            const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
            &LETTERS[token as usize % 52..token as usize % 52 + 1]
        }

        fn is_end_of_generation(&self, token: u32) -> bool {
            token == EOG
        }
    }

    fn policy() -> GeneratePolicy {
        GeneratePolicy {
            max_concurrent_sequences: 3,
            max_total_tokens: 60,
            prefill_chunk: 4,
            max_waiting: 8,
            ..GeneratePolicy::default()
        }
    }

    fn request(
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> (
        GenerationRequest,
        tokio::sync::mpsc::UnboundedReceiver<Event>,
    ) {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let request = GenerationRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: Vec::new(),
            events,
            arrived: Instant::now(),
        };
        (request, rx)
    }

    /// Text and the one Done event of a finished request.
    fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, Event) {
        let mut text = String::new();
        loop {
            match rx
                .blocking_recv()
                .expect("a Done event before the channel closes")
            {
                Event::Text { text: t, .. } => text.push_str(&t),
                done => {
                    assert!(rx.blocking_recv().is_none(), "events after Done");
                    return (text, done);
                }
            }
        }
    }

    #[test]
    fn every_request_gets_its_own_answer_whatever_runs_beside_it() {
        let prompts: Vec<Vec<u32>> = (1..=7).map(|i| (1..=i * 2).collect()).collect();
        let solo: Vec<(String, Event)> = prompts
            .iter()
            .map(|p| {
                let s =
                    Scheduler::spawn("m", Fake::default(), policy(), GenerateMetrics::detached())
                        .unwrap();
                let (r, mut rx) = request(p.clone(), 5);
                s.submit(r).unwrap();
                collect(&mut rx)
            })
            .collect();
        let fake = Fake::default();
        let s = Scheduler::spawn("m", fake.clone(), policy(), GenerateMetrics::detached()).unwrap();
        let mut receivers = Vec::new();
        for p in &prompts {
            let (r, rx) = request(p.clone(), 5);
            s.submit(r).unwrap();
            receivers.push(rx);
        }
        let together: Vec<(String, Event)> = receivers.iter_mut().map(collect).collect();
        // Running beside others may change where a prompt's KV cache came from (the prefix
        // cache holds the prompts that finished before it started), never what it says.
        let uncached = |(text, done): &(String, Event)| match done {
            Event::Done {
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                assert!(*cached_tokens + 2 <= *prompt_tokens || *cached_tokens == 0);
                (text.clone(), *finish, *prompt_tokens, *completion_tokens)
            }
            other => panic!("not a Done event: {other:?}"),
        };
        let together: Vec<_> = together.iter().map(uncached).collect();
        assert_eq!(together, solo.iter().map(uncached).collect::<Vec<_>>());
        for (p, (text, finish, prompt_tokens, completion_tokens)) in prompts.iter().zip(&together) {
            assert_eq!(text.len(), 5);
            assert_eq!(*finish, FinishReason::Length);
            assert_eq!((*prompt_tokens, *completion_tokens), (p.len(), 5));
        }
        let steps = fake.steps.lock().unwrap();
        assert!(
            steps.iter().any(|s| s.len() > 1),
            "no step ran several sequences"
        );
        for step in steps.iter() {
            assert!(
                step.len() <= 3,
                "more than max_concurrent_sequences in {step:?}"
            );
            // Prompt slices are never one token long (`prompt_take`), so the chunks of more
            // than one are the prompt's; one lone last token may ride along.
            let prefill: usize = step.iter().filter(|&&n| n > 1).sum();
            assert!(
                prefill <= 5,
                "a step took {prefill} prompt tokens (chunk is 4)"
            );
        }
    }

    #[test]
    fn prompt_slices_are_never_one_token_and_the_first_in_line_progresses() {
        for chunk in 2..10 {
            for budget in 1..=chunk {
                for left in 1..30 {
                    let take = prompt_take(left, budget, chunk);
                    let at = format!("left {left}, budget {budget}, chunk {chunk}: {take}");
                    assert!(take <= left && take <= budget + 1, "{at}");
                    if left > 1 {
                        assert!(take != 1 && left - take != 1, "{at}");
                    }
                    if budget == chunk {
                        assert!(take > 0, "{at}");
                    }
                }
            }
        }
        // One-token chunks by configuration: one token at a time, as asked.
        assert_eq!(prompt_take(5, 1, 1), 1);
    }

    #[test]
    fn a_prompt_that_starts_like_a_finished_one_computes_only_the_rest() {
        let solo = |prompt: &[u32]| {
            let s = Scheduler::spawn("m", Fake::default(), policy(), GenerateMetrics::detached())
                .unwrap();
            let (r, mut rx) = request(prompt.to_vec(), 3);
            s.submit(r).unwrap();
            collect(&mut rx)
        };
        let fake = Fake::default();
        let metrics = GenerateMetrics::detached();
        let s = Scheduler::spawn("m", fake.clone(), policy(), metrics.clone()).unwrap();
        let first: Vec<u32> = (1..=10).collect();
        let mut second = first[..8].to_vec();
        second.extend([20, 21, 22]);
        // The second shares 8 tokens with the first; the third repeats the first, and still
        // computes its last two.
        for (prompt, cached, total) in [(&first, 0, 0), (&second, 8, 8), (&first, 8, 16)] {
            let (r, mut rx) = request(prompt.clone(), 3);
            s.submit(r).unwrap();
            let (text, done) = collect(&mut rx);
            let (solo_text, mut solo_done) = solo(prompt);
            if let Event::Done { cached_tokens, .. } = &mut solo_done {
                assert_eq!(*cached_tokens, 0, "a lone prompt has nothing to copy");
                *cached_tokens = cached;
            }
            assert_eq!((text, done), (solo_text, solo_done));
            assert_eq!(metrics.prompt_cached_tokens_total.get(), total);
        }
        // Prompt slices are never one token long, so the longer chunks are all the prompt
        // tokens computed: 10, then 3, then 2.
        let steps = fake.steps.lock().unwrap();
        let computed: usize = steps.iter().flatten().filter(|&&n| n > 1).sum();
        assert_eq!(computed, 10 + 3 + 2);
    }

    #[test]
    fn gauges_return_to_zero_when_the_work_is_done() {
        let metrics = GenerateMetrics::detached();
        let s = Scheduler::spawn("m", Fake::default(), policy(), metrics.clone()).unwrap();
        let (r, mut rx) = request(vec![1, 2, 3], 4);
        s.submit(r).unwrap();
        collect(&mut rx);
        // The worker publishes right after its last step; wait for it, boundedly.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.running_sequences.get() != 0 || metrics.kv_cache_tokens.get() != 0 {
            assert!(
                Instant::now() < deadline,
                "gauges stuck after the last sequence left"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn admission_waits_for_the_kv_budget() {
        let fake = Fake::default();
        let s = Scheduler::spawn("m", fake.clone(), policy(), GenerateMetrics::detached()).unwrap();
        // Each reserves 2 + 25 = 27 of 60 tokens: two fit at once, never three.
        let mut receivers: Vec<_> = (0..4)
            .map(|i| {
                let (r, rx) = request(vec![i + 1, i + 2], 25);
                s.submit(r).unwrap();
                rx
            })
            .collect();
        for rx in &mut receivers {
            collect(rx);
        }
        assert!(fake.steps.lock().unwrap().iter().all(|s| s.len() <= 2));
    }

    #[test]
    fn end_of_generation_stops_and_a_gone_client_is_dropped() {
        let fake = Fake::default();
        let s = Scheduler::spawn("m", fake.clone(), policy(), GenerateMetrics::detached()).unwrap();
        let (r, mut rx) = request(vec![3, 0], 10);
        s.submit(r).unwrap();
        assert_eq!(
            collect(&mut rx),
            (
                String::new(),
                Event::Done {
                    finish: FinishReason::Stop,
                    prompt_tokens: 2,
                    cached_tokens: 0,
                    completion_tokens: 1
                }
            )
        );
        let (r, rx) = request(vec![5], 10_000 - 1);
        let mut big_policy = policy();
        big_policy.max_total_tokens = 10_000;
        let s =
            Scheduler::spawn("m", fake.clone(), big_policy, GenerateMetrics::detached()).unwrap();
        s.submit(r).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        drop(rx);
        let steps_then = fake.steps.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(50));
        let steps_now = fake.steps.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            fake.steps.lock().unwrap().len(),
            steps_now,
            "still stepping after the client left"
        );
        assert!(steps_now - steps_then <= 1, "freed within one step");
    }

    #[test]
    fn a_full_waiting_queue_is_refused_at_once() {
        let mut p = policy();
        p.max_concurrent_sequences = 1;
        p.max_waiting = 2;
        p.max_total_tokens = 1_000_000;
        let s = Scheduler::spawn("m", Fake::default(), p, GenerateMetrics::detached()).unwrap();
        let mut keep = Vec::new();
        let mut refused = 0;
        for _ in 0..10 {
            let (r, rx) = request(vec![1], 100_000);
            match s.submit(r) {
                Ok(()) => keep.push(rx),
                Err(BatchError::QueueFull { capacity: 2, .. }) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused >= 7, "{refused} refused");
    }
}

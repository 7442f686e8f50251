//! The async side of a model's batcher and its compute thread.
//!
//! `submit` reserves queue slots (a semaphore, so a full queue answers at once) and hands inputs
//! to a tokio task that owns the [`BatchQueue`]. When a batch is due and the compute thread is
//! idle, the task sends the batch to the thread, which skips inputs whose client has gone, runs
//! the engine and answers each input through its own oneshot.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::queue::BatchQueue;
use super::{BatchEngine, BatchError, QueueWait};
use crate::metrics::BatcherMetrics;
use crate::repository::BatchPolicy;

/// The answer for one input.
pub type Reply<O> = oneshot::Receiver<Result<O, BatchError>>;

struct Job<I, O> {
    input: I,
    tokens: usize,
    reply: oneshot::Sender<Result<O, BatchError>>,
    /// Holds the input's queue slot until it is answered, so the bound covers compute too.
    _slot: OwnedSemaphorePermit,
    /// Counts the input in the queue-depth gauge until its batch starts.
    waiting: Option<DepthGuard>,
}

struct DepthGuard(prometheus::IntGauge);

impl Drop for DepthGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct Batch<I, O> {
    jobs: Vec<Job<I, O>>,
    padded_tokens: usize,
    /// Returned to the loop when the compute thread is idle again.
    _idle: OwnedSemaphorePermit,
}

/// Handle to one model's batcher; cheap to clone.
pub struct Batcher<E: BatchEngine> {
    model: Arc<str>,
    capacity: usize,
    slots: Arc<Semaphore>,
    jobs: mpsc::UnboundedSender<Job<E::Input, E::Output>>,
    metrics: BatcherMetrics,
    wait: QueueWait,
}

impl<E: BatchEngine> Clone for Batcher<E> {
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            capacity: self.capacity,
            slots: self.slots.clone(),
            jobs: self.jobs.clone(),
            metrics: self.metrics.clone(),
            wait: self.wait.clone(),
        }
    }
}

impl<E: BatchEngine> Batcher<E> {
    /// Starts the batching loop on the current tokio runtime and one compute thread per engine
    /// instance; any idle instance takes the next batch.
    pub fn spawn(
        model: &str,
        engines: Vec<E>,
        policy: BatchPolicy,
        metrics: BatcherMetrics,
    ) -> std::io::Result<Self> {
        assert!(
            !engines.is_empty(),
            "a batcher needs at least one engine instance"
        );
        let instances = engines.len();
        let (batch_tx, batch_rx) =
            std::sync::mpsc::sync_channel::<Batch<E::Input, E::Output>>(instances);
        let batch_rx = Arc::new(std::sync::Mutex::new(batch_rx));
        let name: Arc<str> = model.into();
        for (i, engine) in engines.into_iter().enumerate() {
            let (name, batches, metrics) = (name.clone(), batch_rx.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("ember-{model}-{i}"))
                .spawn(move || compute_loop(&name, engine, &batches, metrics))?;
        }
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let wait = QueueWait::default();
        tokio::spawn(batch_loop(
            BatchQueue::new(policy),
            jobs_rx,
            batch_tx,
            instances,
            metrics.clone(),
            wait.clone(),
        ));
        Ok(Self {
            model: name,
            capacity: policy.queue_capacity,
            slots: Arc::new(Semaphore::new(policy.queue_capacity)),
            jobs: jobs_tx,
            metrics,
            wait,
        })
    }

    /// Queues inputs, each with its token count; returns one reply per input, in order. All or
    /// nothing: a queue without room for every input refuses the whole request at once.
    pub fn submit(
        &self,
        inputs: Vec<(E::Input, usize)>,
    ) -> Result<Vec<Reply<E::Output>>, BatchError> {
        let count = inputs.len();
        if count > self.capacity {
            return Err(BatchError::TooManyInputs {
                model: self.model.to_string(),
                count,
                capacity: self.capacity,
            });
        }
        let Ok(mut slots) = self.slots.clone().try_acquire_many_owned(count as u32) else {
            return Err(BatchError::QueueFull {
                model: self.model.to_string(),
                capacity: self.capacity,
            });
        };
        let mut replies = Vec::with_capacity(count);
        for (input, tokens) in inputs {
            let (tx, rx) = oneshot::channel();
            let slot = slots.split(1).expect("one permit was reserved per input");
            self.metrics.queue_depth_items.inc();
            let job = Job {
                input,
                tokens,
                reply: tx,
                _slot: slot,
                waiting: Some(DepthGuard(self.metrics.queue_depth_items.clone())),
            };
            if self.jobs.send(job).is_err() {
                return Err(BatchError::Stopped(self.model.to_string()));
            }
            replies.push(rx);
        }
        Ok(replies)
    }

    /// Inputs queued or being computed right now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// How long an input queued now would likely wait for a compute thread.
    pub fn expected_wait(&self) -> std::time::Duration {
        let waiting = self.metrics.queue_depth_items.get().max(0) as usize;
        self.wait.expected(waiting)
    }
}

async fn batch_loop<I: Send + 'static, O: Send + 'static>(
    mut queue: BatchQueue<Job<I, O>>,
    mut jobs: mpsc::UnboundedReceiver<Job<I, O>>,
    compute: std::sync::mpsc::SyncSender<Batch<I, O>>,
    instances: usize,
    metrics: BatcherMetrics,
    wait: QueueWait,
) {
    // One permit per idle compute instance.
    let idle = Arc::new(Semaphore::new(instances));
    let mut open = true;
    while open || !queue.is_empty() {
        let due = queue.should_flush(Instant::now()) || (!open && !queue.is_empty());
        let deadline = queue.deadline();
        tokio::select! {
            // Dispatch first: under a steady stream of arrivals a due batch must still go.
            biased;
            permit = idle.clone().acquire_owned(), if due => {
                let permit = permit.expect("the idle semaphore is never closed");
                let cancelled = queue.remove_where(|job| job.reply.is_closed());
                metrics.cancelled_items_total.inc_by(cancelled as u64);
                // This instance and the others still idle share what waits.
                let pending = queue.take_batch(1 + idle.available_permits());
                if pending.is_empty() {
                    continue;
                }
                let now = Instant::now();
                let longest = pending.iter().map(|p| p.tokens).max().unwrap_or(0);
                let padded_tokens = longest * pending.len();
                let jobs = pending
                    .into_iter()
                    .map(|p| {
                        let waited = now - p.arrived;
                        metrics.queue_duration_seconds.observe(waited.as_secs_f64());
                        wait.observe(waited);
                        p.item
                    })
                    .collect();
                let batch = Batch { jobs, padded_tokens, _idle: permit };
                if compute.send(batch).is_err() {
                    // The compute threads are gone (they only exit when this loop does); the
                    // replies' senders drop with the batch and every waiter sees an error.
                    return;
                }
            }
            job = jobs.recv(), if open => match job {
                Some(job) => {
                    let now = Instant::now();
                    queue.push_job(job, now);
                    // A request's inputs arrive together: take all that are already here before
                    // deciding, so they are not split over batches needlessly.
                    while let Ok(job) = jobs.try_recv() {
                        queue.push_job(job, now);
                    }
                }
                None => open = false,
            },
            _ = sleep_until_opt(deadline), if !due && deadline.is_some() => {}
        }
    }
}

impl<I, O> BatchQueue<Job<I, O>> {
    fn push_job(&mut self, job: Job<I, O>, now: Instant) {
        let tokens = job.tokens;
        self.push(job, tokens, now);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

fn compute_loop<E: BatchEngine>(
    model: &str,
    mut engine: E,
    batches: &std::sync::Mutex<std::sync::mpsc::Receiver<Batch<E::Input, E::Output>>>,
    metrics: BatcherMetrics,
) {
    loop {
        // The lock is held only while waiting for the next batch, never while computing.
        let next = batches.lock().map(|rx| rx.recv());
        let Ok(Ok(batch)) = next else { return };
        let mut inputs = Vec::with_capacity(batch.jobs.len());
        let mut replies = Vec::with_capacity(batch.jobs.len());
        for mut job in batch.jobs {
            job.waiting = None;
            // The client may have gone while the batch waited for this thread.
            if job.reply.is_closed() {
                metrics.cancelled_items_total.inc();
                continue;
            }
            inputs.push(job.input);
            replies.push((job.reply, job._slot));
        }
        if inputs.is_empty() {
            continue;
        }
        metrics.batch_size_items.observe(inputs.len() as f64);
        metrics
            .batch_size_tokens
            .observe(batch.padded_tokens as f64);
        let started = std::time::Instant::now();
        let expected = inputs.len();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| engine.run(inputs)));
        metrics
            .inference_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        let failure = |message: String| BatchError::Engine {
            model: model.to_string(),
            message,
        };
        let result = match outcome {
            Ok(Ok(outputs)) if outputs.len() == expected => Ok(outputs),
            Ok(Ok(outputs)) => Err(failure(format!(
                "the engine returned {} outputs for {expected} inputs",
                outputs.len()
            ))),
            Ok(Err(message)) => Err(failure(message)),
            Err(_) => Err(failure("the engine panicked".into())),
        };
        // The instance and each input's slot are free before its answer goes out, so a client
        // that sends again as soon as it has its answer finds them free: a full queue's 503 is
        // never about inputs already answered.
        drop(batch._idle);
        let answer = |(reply, slot): (oneshot::Sender<_>, OwnedSemaphorePermit), outcome| {
            drop(slot);
            let _ = reply.send(outcome);
        };
        match result {
            Ok(outputs) => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    answer(reply, Ok(output));
                }
            }
            Err(err) => {
                tracing::error!(model, %err, "batch failed");
                for reply in replies {
                    answer(reply, Err(err.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Doubles each input and records every batch it saw; optionally waits for a gate first.
    /// Instances share one gate: each batch takes one pass, whichever instance computes it.
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: Option<Arc<Mutex<std::sync::mpsc::Receiver<()>>>>,
    }

    impl BatchEngine for Recorder {
        type Input = u32;
        type Output = u32;
        fn run(&mut self, inputs: Vec<u32>) -> Result<Vec<u32>, String> {
            if let Some(gate) = &self.gate {
                let _ = gate.lock().unwrap().recv();
            }
            if inputs.contains(&666) {
                panic!("the test asked for a panic");
            }
            if inputs.contains(&13) {
                return Err("unlucky input".into());
            }
            self.batches.lock().unwrap().push(inputs.clone());
            Ok(inputs.into_iter().map(|x| x * 2).collect())
        }
    }

    type Seen = Arc<Mutex<Vec<Vec<u32>>>>;

    fn batcher(
        size: usize,
        tokens: usize,
        delay_ms: u64,
        capacity: usize,
        gated: bool,
    ) -> (Batcher<Recorder>, Seen, Option<std::sync::mpsc::Sender<()>>) {
        instances(1, size, tokens, delay_ms, capacity, gated)
    }

    /// `n` engine instances sharing one record of batches, and one gate if `gated`.
    fn instances(
        n: usize,
        size: usize,
        tokens: usize,
        delay_ms: u64,
        capacity: usize,
        gated: bool,
    ) -> (Batcher<Recorder>, Seen, Option<std::sync::mpsc::Sender<()>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = std::sync::mpsc::channel();
        let gate_rx = Arc::new(Mutex::new(gate_rx));
        let engines = (0..n)
            .map(|_| Recorder {
                batches: batches.clone(),
                gate: gated.then(|| gate_rx.clone()),
            })
            .collect();
        let policy = BatchPolicy {
            max_batch_size: size,
            max_batch_tokens: tokens,
            max_queue_delay_ms: delay_ms,
            queue_capacity: capacity,
            instances: n,
        };
        let b = Batcher::spawn("m", engines, policy, BatcherMetrics::detached()).unwrap();
        (b, batches, gated.then_some(gate_tx))
    }

    async fn answers(replies: Vec<Reply<u32>>) -> Vec<Result<u32, BatchError>> {
        let mut out = Vec::new();
        for r in replies {
            out.push(r.await.expect("every input gets an answer"));
        }
        out
    }

    fn ok(values: &[u32]) -> Vec<Result<u32, BatchError>> {
        values.iter().map(|&v| Ok(v)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_without_waiting_for_the_delay() {
        let (b, seen, _) = batcher(4, 1000, 10_000, 64, false);
        let start = Instant::now();
        let replies = b.submit((1..=4).map(|i| (i, 10)).collect()).unwrap();
        assert_eq!(answers(replies).await, ok(&[2, 4, 6, 8]));
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(*seen.lock().unwrap(), vec![vec![1, 2, 3, 4]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_waits_exactly_the_delay() {
        let (b, seen, _) = batcher(4, 1000, 5, 64, false);
        let start = Instant::now();
        let replies = b.submit(vec![(1, 10), (2, 10)]).unwrap();
        assert_eq!(answers(replies).await, ok(&[2, 4]));
        assert_eq!(start.elapsed(), Duration::from_millis(5));
        assert_eq!(*seen.lock().unwrap(), vec![vec![1, 2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_budget_splits_batches() {
        let (b, seen, _) = batcher(32, 100, 5, 64, false);
        let start = Instant::now();
        let replies = b.submit(vec![(1, 60), (2, 60)]).unwrap();
        assert_eq!(answers(replies).await, ok(&[2, 4]));
        // The first went at once (the tokens filled a batch); the second alone waited its delay.
        assert_eq!(start.elapsed(), Duration::from_millis(5));
        assert_eq!(*seen.lock().unwrap(), vec![vec![1], vec![2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn results_keep_input_order_across_batches() {
        let (b, seen, _) = batcher(3, 1000, 1, 64, false);
        let replies = b.submit((1..=10).map(|i| (i, 10)).collect()).unwrap();
        let want: Vec<u32> = (1..=10).map(|i| i * 2).collect();
        assert_eq!(answers(replies).await, ok(&want));
        let sizes: Vec<usize> = seen.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, 3, 3, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_instances_split_a_request_and_a_busy_one_gets_none_of_it() {
        // Both idle: a request of 10 (more than a batch of 8) goes out as two batches of 5, both
        // at once: the second does not wait out the queue delay for company.
        let (b, seen, gate) = instances(2, 8, 1000, 50, 64, true);
        let gate = gate.unwrap();
        let start = Instant::now();
        let replies = b.submit((1..=10).map(|i| (i, 10)).collect()).unwrap();
        // Both batches go out before either instance may finish (and count as idle again).
        tokio::task::yield_now().await;
        (0..2).for_each(|_| gate.send(()).unwrap());
        let want: Vec<u32> = (1..=10).map(|i| i * 2).collect();
        assert_eq!(answers(replies).await, ok(&want));
        // The paused clock moves only when a timer is all that is left: none was.
        assert_eq!(start.elapsed(), Duration::ZERO);
        let mut sizes: Vec<usize> = seen.lock().unwrap().iter().map(Vec::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![5, 5]);

        // One instance busy (held at its gate): the idle one takes all that arrives.
        seen.lock().unwrap().clear();
        let first = b.submit(vec![(1, 10)]).unwrap();
        // The lone input goes after the queue delay, to an instance that then blocks.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let rest = b.submit((2..=9).map(|i| (i, 10)).collect()).unwrap();
        tokio::task::yield_now().await;
        (0..2).for_each(|_| gate.send(()).unwrap());
        assert_eq!(answers(first).await, ok(&[2]));
        let want: Vec<u32> = (2..=9).map(|i| i * 2).collect();
        assert_eq!(answers(rest).await, ok(&want));
        let mut sizes: Vec<usize> = seen.lock().unwrap().iter().map(Vec::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_input_never_reaches_the_engine() {
        let (b, seen, gate) = batcher(1, 1000, 0, 64, true);
        let gate = gate.unwrap();
        let first = b.submit(vec![(1, 10)]).unwrap();
        // Let the first batch reach the (blocked) compute thread.
        tokio::task::yield_now().await;
        let cancelled = b.submit(vec![(2, 10)]).unwrap();
        drop(cancelled);
        let third = b.submit(vec![(3, 10)]).unwrap();
        for _ in 0..2 {
            gate.send(()).unwrap();
        }
        assert_eq!(answers(first).await, ok(&[2]));
        assert_eq!(answers(third).await, ok(&[6]));
        assert_eq!(*seen.lock().unwrap(), vec![vec![1], vec![3]]);
        assert_eq!(b.metrics.cancelled_items_total.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once_and_frees_slots_after() {
        let (b, _, gate) = batcher(2, 1000, 0, 4, true);
        let gate = gate.unwrap();
        let held = b.submit((1..=4).map(|i| (i, 10)).collect()).unwrap();
        assert_eq!(b.in_flight(), 4);
        assert!(matches!(
            b.submit(vec![(9, 10)]),
            Err(BatchError::QueueFull { capacity: 4, .. })
        ));
        assert!(matches!(
            b.submit((0..5).map(|i| (i, 1)).collect()),
            Err(BatchError::TooManyInputs {
                count: 5,
                capacity: 4,
                ..
            })
        ));
        for _ in 0..2 {
            gate.send(()).unwrap();
        }
        assert_eq!(answers(held).await, ok(&[2, 4, 6, 8]));
        assert_eq!(b.in_flight(), 0);
        gate.send(()).unwrap();
        assert_eq!(answers(b.submit(vec![(5, 10)]).unwrap()).await, ok(&[10]));
    }

    #[tokio::test(start_paused = true)]
    async fn engine_errors_and_panics_answer_every_input_of_the_batch() {
        let (b, _, _) = batcher(2, 1000, 0, 64, false);
        for poison in [13, 666] {
            let replies = b.submit(vec![(1, 10), (poison, 10)]).unwrap();
            for answer in answers(replies).await {
                assert!(
                    matches!(answer, Err(BatchError::Engine { .. })),
                    "{answer:?}"
                );
            }
        }
        // The compute thread survived the panic.
        assert_eq!(answers(b.submit(vec![(4, 10)]).unwrap()).await, ok(&[8]));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// Requests sent together: each gets exactly one answer per input, its own (results
            /// never cross), and every input is computed once.
            #[test]
            fn every_input_gets_its_own_answer_once(
                requests in prop::collection::vec(
                    prop::collection::vec(0u32..1000, 1..12), 1..24),
                size in 1usize..9,
            ) {
                let requests: Vec<Vec<u32>> = requests
                    .into_iter()
                    .map(|r| r.into_iter().filter(|x| *x != 13 && *x != 666).collect::<Vec<_>>())
                    .filter(|r| !r.is_empty())
                    .collect();
                let total: usize = requests.iter().map(Vec::len).sum();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                let (answers, computed) = runtime.block_on(async {
                    let (b, seen, _) = batcher(size, 1 << 20, 0, 4096, false);
                    let pending: Vec<_> = requests
                        .iter()
                        .map(|r| b.submit(r.iter().map(|&x| (x, 1)).collect()).unwrap())
                        .collect();
                    let mut answers = Vec::new();
                    for replies in pending {
                        answers.push(answers_of(replies).await);
                    }
                    let computed: usize = seen.lock().unwrap().iter().map(Vec::len).sum();
                    (answers, computed)
                });
                for (request, answer) in requests.iter().zip(&answers) {
                    let want: Vec<u32> = request.iter().map(|x| x * 2).collect();
                    prop_assert_eq!(answer, &want);
                }
                prop_assert_eq!(computed, total);
            }
        }

        async fn answers_of(replies: Vec<Reply<u32>>) -> Vec<u32> {
            answers(replies)
                .await
                .into_iter()
                .map(|r| r.expect("no engine error"))
                .collect()
        }
    }
}

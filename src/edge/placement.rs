//! Where one request runs: the rule of DESIGN.md, "Edge placement", as a pure function of what
//! the edge knows at that moment.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The model's place: local for the edge's own models, upstream for the rest.
    Tier,
    /// A local model's queue is too long; the upstream takes the request.
    Spillover,
    /// A spill was due but the upstream cannot take it, so the local queue does.
    Fallback,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tier => "tier",
            Self::Spillover => "spillover",
            Self::Fallback => "fallback",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Local(Reason),
    Upstream(Reason),
    /// Not local, and the upstream's circuit is open.
    Unavailable,
    /// Not local, and the upstream's last model list does not have it either.
    NotFound,
}

/// When a local model's queue sends requests upstream.
#[derive(Debug, Clone, Copy)]
pub struct SpillPolicy {
    pub enabled: bool,
    pub threshold: Duration,
}

/// What the edge knows about the requested model.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// The expected queue wait of the local model; `None` when the model is not local.
    pub local_wait: Option<Duration>,
    /// The upstream's circuit is not open.
    pub upstream_available: bool,
    /// Whether the upstream's last model list has it; `None` before the first list arrived.
    pub upstream_serves: Option<bool>,
}

pub fn place(facts: Facts, spill: SpillPolicy) -> Placement {
    match facts.local_wait {
        Some(wait) if spill.enabled && wait > spill.threshold => {
            if facts.upstream_available && facts.upstream_serves == Some(true) {
                Placement::Upstream(Reason::Spillover)
            } else {
                Placement::Local(Reason::Fallback)
            }
        }
        Some(_) => Placement::Local(Reason::Tier),
        // A closed circuit forwards even a model missing from the last list: the list may be
        // a probe interval old, and the upstream answers an unknown model with its own 404.
        None if facts.upstream_available => Placement::Upstream(Reason::Tier),
        None if facts.upstream_serves == Some(false) => Placement::NotFound,
        None => Placement::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPILL: SpillPolicy = SpillPolicy {
        enabled: true,
        threshold: Duration::from_millis(100),
    };

    fn facts(local_wait_ms: Option<u64>, available: bool, serves: Option<bool>) -> Facts {
        Facts {
            local_wait: local_wait_ms.map(Duration::from_millis),
            upstream_available: available,
            upstream_serves: serves,
        }
    }

    #[test]
    fn local_models_stay_local_below_the_threshold_even_with_the_upstream_down() {
        for (available, serves) in [(true, Some(true)), (false, None), (false, Some(true))] {
            assert_eq!(
                place(facts(Some(100), available, serves), SPILL),
                Placement::Local(Reason::Tier)
            );
        }
    }

    #[test]
    fn a_long_local_queue_spills_only_to_a_healthy_upstream_that_serves_the_model() {
        assert_eq!(
            place(facts(Some(101), true, Some(true)), SPILL),
            Placement::Upstream(Reason::Spillover)
        );
        for (available, serves) in [(false, Some(true)), (true, Some(false)), (true, None)] {
            assert_eq!(
                place(facts(Some(500), available, serves), SPILL),
                Placement::Local(Reason::Fallback)
            );
        }
        let off = SpillPolicy {
            enabled: false,
            ..SPILL
        };
        assert_eq!(
            place(facts(Some(500), true, Some(true)), off),
            Placement::Local(Reason::Tier)
        );
    }

    #[test]
    fn remote_models_go_upstream_unless_its_circuit_is_open() {
        assert_eq!(
            place(facts(None, true, None), SPILL),
            Placement::Upstream(Reason::Tier)
        );
        assert_eq!(
            place(facts(None, true, Some(false)), SPILL),
            Placement::Upstream(Reason::Tier)
        );
        assert_eq!(
            place(facts(None, false, Some(true)), SPILL),
            Placement::Unavailable
        );
        assert_eq!(
            place(facts(None, false, None), SPILL),
            Placement::Unavailable
        );
        assert_eq!(
            place(facts(None, false, Some(false)), SPILL),
            Placement::NotFound
        );
    }
}

//! The agent's Prometheus metrics (`/metrics` on `metrics_listen`): VMs by
//! phase, VMM starts and exits by reason, whether the controllers answer, the
//! assignment revision, and reports waiting to be delivered.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

pub struct Metrics {
    registry: Registry,
    vms: Family<PhaseLabel, Gauge>,
    starts: Counter,
    exits: Family<ReasonLabel, Counter>,
    controllers_up: Gauge,
    revision: Gauge,
    reports_pending: Gauge,
    phases_seen: Mutex<Vec<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("basalt_agent");
        let vms = Family::<PhaseLabel, Gauge>::default();
        let starts = Counter::default();
        let exits = Family::<ReasonLabel, Counter>::default();
        let controllers_up = Gauge::default();
        let revision = Gauge::default();
        let reports_pending = Gauge::default();
        registry.register("vms", "VMs on this host by observed phase", vms.clone());
        registry.register("vmm_starts", "basalt-vmm processes started", starts.clone());
        registry.register("vmm_exits", "basalt-vmm processes that ended, by reason", exits.clone());
        registry.register("controllers_up", "1 while the last heartbeat was answered", controllers_up.clone());
        registry.register("assignments_revision", "Revision of the last assignment set received", revision.clone());
        registry.register("reports_pending", "Status reports waiting for the controllers", reports_pending.clone());
        Metrics {
            registry,
            vms,
            starts,
            exits,
            controllers_up,
            revision,
            reports_pending,
            phases_seen: Mutex::new(Vec::new()),
        }
    }

    pub fn start(&self) {
        self.starts.inc();
    }
    pub fn exit(&self, reason: &str) {
        self.exits.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }
    pub fn set_controllers_up(&self, up: bool) {
        self.controllers_up.set(i64::from(up));
    }
    pub fn set_revision(&self, r: u64) {
        self.revision.set(r as i64);
    }
    pub fn set_reports_pending(&self, n: usize) {
        self.reports_pending.set(n as i64);
    }

    /// Phases no VM is in any more read 0 rather than keep their last count.
    pub fn set_vm_phases(&self, counts: &BTreeMap<&'static str, i64>) {
        let Ok(mut seen) = self.phases_seen.lock() else { return };
        for p in counts.keys() {
            if !seen.iter().any(|s| s == p) {
                seen.push(p.to_string());
            }
        }
        for p in seen.iter() {
            self.vms.get_or_create(&PhaseLabel { phase: p.clone() }).set(counts.get(p.as_str()).copied().unwrap_or(0));
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

//! The agent's life: register the host, then heartbeat, watch assignments and
//! report, each in its own task, each retrying on its own, so a controller
//! outage only delays them. The supervisor keeps the VMs as last assigned.

use std::sync::Arc;
use std::time::Duration;

use basalt_proto::v1 as pb;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::Config;
use crate::controllers::{is_transport, Controllers};
use crate::metrics::Metrics;
use crate::reporter::{self, ReporterMsg};
use crate::supervisor::{Event, Supervisor};

pub struct Agent {
    cfg: Arc<Config>,
    ctl: Arc<Controllers>,
    metrics: Arc<Metrics>,
    /// The host's NICs and what the profile set on them (once, at start).
    nics: Vec<pb::HostNic>,
}

impl Agent {
    pub fn new(cfg: Config) -> Self {
        let ctl = Arc::new(Controllers::new(cfg.controllers.clone()));
        let root = crate::nic::Root("/".into());
        let mut nics = crate::nic::discover(&root);
        crate::nic::apply(&root, &cfg.nic_profile, &mut nics, crate::nic::host_cpus());
        Agent { cfg: Arc::new(cfg), ctl, metrics: Arc::new(Metrics::new()), nics }
    }

    /// Runs until `shutdown` resolves. VMs are left running: they belong to
    /// the cluster, not to this process (the next agent adopts them).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
        let cfg = self.cfg.clone();
        std::fs::create_dir_all(cfg.state_dir.join("vms"))
            .map_err(|e| format!("state dir {}: {e}", cfg.state_dir.display()))?;
        if let Some(addr) = cfg.metrics_listen {
            let l = basalt_metrics_http::bind(addr).await.map_err(|e| format!("metrics on {addr}: {e}"))?;
            info!("metrics on http://{}/metrics", l.local_addr().map_err(|e| e.to_string())?);
            let m = self.metrics.clone();
            tokio::spawn(basalt_metrics_http::serve(l, Arc::new(move || m.render())));
        }
        let node_listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("node service on {}: {e}", cfg.listen))?;
        info!("node service on {}", cfg.listen);
        let node_api = basalt_proto::v1::node_service_server::NodeServiceServer::new(crate::node_service::NodeApi {
            state_dir: cfg.state_dir.clone(),
        });
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(node_listener);
            if let Err(e) =
                tonic::transport::Server::builder().add_service(node_api).serve_with_incoming(incoming).await
            {
                warn!("node service stopped: {e}");
            }
        });
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let (rep_tx, rep_rx) = mpsc::unbounded_channel();
        let mut sup = Supervisor::new(cfg.clone(), ev_tx.clone(), rep_tx.clone(), self.metrics.clone());
        sup.adopt();
        tokio::spawn(sup.run(ev_rx));
        tokio::spawn(reporter::run(
            cfg.host_id.clone(),
            self.ctl.clone(),
            self.metrics.clone(),
            cfg.timing.retry_max,
            rep_rx,
        ));
        let me = Arc::new(self);
        let work = {
            let me = me.clone();
            async move {
                let interval = me.register_until_done().await;
                tokio::spawn(me.clone().heartbeats(interval, rep_tx.clone()));
                me.watch(ev_tx, rep_tx).await;
            }
        };
        tokio::select! {
            _ = work => Ok(()),
            _ = shutdown => {
                info!("stopping the agent; its VMs keep running");
                Ok(())
            }
        }
    }

    async fn register(&self) -> Result<Duration, tonic::Status> {
        let cfg = &self.cfg;
        let mut client = self.ctl.agent().await.map_err(tonic::Status::unavailable)?;
        let req = pb::RegisterRequest {
            id: cfg.host_id.clone(),
            address: cfg.address.clone(),
            arch: cfg.arch.clone(),
            capacity: Some(pb::Capacity { vcpus: cfg.vcpus, memory_mib: cfg.memory_mib }),
            labels: cfg.labels.clone().into_iter().collect(),
            cpu_features: crate::cpu::host_features(),
            nics: self.nics.clone(),
            nic_profile: cfg.nic_profile.name.clone(),
        };
        let features = req.cpu_features.len();
        let r = client.register(req).await?.into_inner();
        info!(
            host = %cfg.host_id, revision = r.revision, vcpus = cfg.vcpus, memory_mib = cfg.memory_mib,
            cpu_features = features, "registered with the controllers"
        );
        Ok(if r.heartbeat_interval_ms > 0 {
            Duration::from_millis(r.heartbeat_interval_ms)
        } else {
            cfg.timing.heartbeat
        })
    }

    /// Registration is retried forever on transport errors; a refusal (bad
    /// labels, a host id clash with another arch...) is logged each time.
    async fn register_until_done(&self) -> Duration {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.register().await {
                Ok(i) => return i,
                Err(s) => {
                    if is_transport(&s) {
                        self.ctl.failed();
                    }
                    warn!("registration failed, retrying in {backoff:?}: {}", s.message());
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.timing.retry_max);
        }
    }

    async fn heartbeats(self: Arc<Self>, interval: Duration, reports: mpsc::UnboundedSender<ReporterMsg>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut up = true;
        loop {
            tick.tick().await;
            let res = match self.ctl.agent().await {
                Ok(mut c) => c.heartbeat(pb::HeartbeatRequest { node: self.cfg.host_id.clone() }).await.map(|_| ()),
                Err(e) => Err(tonic::Status::unavailable(e)),
            };
            match res {
                Ok(()) => {
                    if !up {
                        info!("the controllers answer again: re-syncing VM status");
                        let _ = reports.send(ReporterMsg::Resync);
                    }
                    up = true;
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    warn!("the controllers do not know this host: registering again");
                    self.register_until_done().await;
                    let _ = reports.send(ReporterMsg::Resync);
                }
                Err(s) => {
                    self.ctl.failed();
                    if up {
                        warn!("heartbeat failed; VMs keep running while the controllers are away: {}", s.message());
                    }
                    up = false;
                }
            }
            self.metrics.set_controllers_up(up);
        }
    }

    /// Follows the assignment watch, resuming from the last revision seen
    /// after any interruption (a controller that died, a lost connection).
    async fn watch(&self, events: mpsc::Sender<Event>, reports: mpsc::UnboundedSender<ReporterMsg>) {
        let node = self.cfg.host_id.clone();
        let mut last = 0u64;
        let mut backoff = Duration::from_millis(200);
        loop {
            let stream = match self.ctl.agent().await {
                Ok(mut c) => {
                    c.watch_assignments(pb::WatchAssignmentsRequest { node: node.clone(), from_revision: last }).await
                }
                Err(e) => Err(tonic::Status::unavailable(e)),
            };
            match stream {
                Ok(resp) => {
                    info!(from_revision = last, "watching assignments");
                    let _ = reports.send(ReporterMsg::Resync);
                    backoff = Duration::from_millis(200);
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(a)) => {
                                last = a.revision;
                                self.metrics.set_revision(last);
                                if events.send(Event::Assigned(a)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {
                                warn!("the assignment watch ended; resuming");
                                break;
                            }
                            Err(s) => {
                                warn!("the assignment watch failed; resuming from revision {last}: {}", s.message());
                                break;
                            }
                        }
                    }
                    self.ctl.failed();
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    warn!("watch: {}; registering again", s.message());
                    self.register_until_done().await;
                }
                Err(s) => {
                    self.ctl.failed();
                    warn!("cannot watch assignments, retrying in {backoff:?}: {}", s.message());
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.timing.retry_max);
        }
    }
}

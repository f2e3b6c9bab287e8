//! Start one controller: open its RocksDB, start the Raft node, serve gRPC
//! (public, agent and Raft services, health, reflection) on one port, serve
//! `/metrics`, run the reconcilers, and shut down on SIGTERM/SIGINT within a
//! few seconds: open calls get [`DRAIN`] to finish (assignment streams are
//! ended at once), Raft [`RAFT_SHUTDOWN`], and nothing waits for Ceph.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::api::agent::AgentApi;
use crate::api::cluster::ClusterApi;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Controller;
use crate::raft::network::Channels;
use crate::raft::service::RaftRpc;
use crate::raft::store::{self, LogStore, StateMachineStore};
use crate::raft::Raft;
use basalt_proto::raft::v1::raft_service_server::RaftServiceServer;
use basalt_proto::v1::agent_service_server::AgentServiceServer;
use basalt_proto::v1::cluster_service_server::ClusterServiceServer;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest Raft message (a snapshot chunk or a batch of entries).
const MAX_RAFT_MESSAGE: usize = 256 << 20;
/// After the stop signal, calls in progress get this long to finish; then
/// the server stops with whatever connections are left.
const DRAIN: Duration = Duration::from_secs(2);
/// How long Raft gets to stop its tasks.
const RAFT_SHUTDOWN: Duration = Duration::from_secs(2);

pub async fn run(cfg: Config) -> Result<(), BoxError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", cfg.data_dir.display()))?;
    let db_dir = cfg.data_dir.join("raft");
    let db = store::open(&db_dir).map_err(|e| format!("cannot open RocksDB at {}: {e}", db_dir.display()))?;
    let log = LogStore::new(db.clone());
    let commit_index = log.commit_index();
    let sm = StateMachineStore::new(db, cfg.event_capacity)?;
    let shared = sm.shared();

    let raft_config = openraft::Config {
        cluster_name: "basalt".into(),
        heartbeat_interval: cfg.raft.heartbeat_ms,
        election_timeout_min: cfg.raft.election_timeout_min_ms,
        election_timeout_max: cfg.raft.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_after_entries),
        max_in_snapshot_log_to_keep: cfg.raft.keep_entries_after_snapshot,
        ..Default::default()
    }
    .validate()?;
    let channels = Channels::default();
    let raft = Raft::new(cfg.node_id, Arc::new(raft_config), channels.clone(), log, sm).await?;

    let metrics = Arc::new(Metrics::new());
    let ctl = Arc::new(Controller::new(
        cfg.node_id,
        cfg.advertise.clone(),
        raft.clone(),
        shared,
        channels,
        cfg.timing(),
        metrics.clone(),
    ));

    if cfg.bootstrap {
        if raft.is_initialized().await? {
            info!("already part of a cluster; --bootstrap ignored");
        } else {
            let mut members: BTreeMap<u64, BasicNode> =
                cfg.peers.iter().map(|(id, a)| (*id, BasicNode::new(a))).collect();
            members.insert(cfg.node_id, BasicNode::new(&cfg.advertise));
            info!(members = ?members.keys().collect::<Vec<_>>(), "initialising a new cluster");
            if let Err(e) = raft.initialize(members).await {
                warn!("initialise: {e}");
            }
        }
    }

    if let Some(addr) = cfg.metrics_listen {
        let listener =
            basalt_metrics_http::bind(addr).await.map_err(|e| format!("metrics: cannot listen on {addr}: {e}"))?;
        let (raft_m, shared) = (raft.clone(), ctl.shared.clone());
        let render = Arc::new(move || {
            let m = raft_m.metrics().borrow().clone();
            let (rev, migrations, active) = {
                let st = shared.read();
                let active = st.cluster.migrations().filter(|m| m.phase.is_active()).count();
                (st.cluster.revision(), st.cluster.migration_stats().clone(), active)
            };
            let mut text = metrics.render(&m, commit_index.load(std::sync::atomic::Ordering::Relaxed), rev);
            crate::metrics::append_migrations(&mut text, &migrations, active);
            text
        });
        info!(%addr, "metrics at http://{addr}/metrics");
        tokio::spawn(async move {
            if let Err(e) = basalt_metrics_http::serve(listener, render).await {
                warn!("metrics server stopped: {e}");
            }
        });
    }

    let reconciler = tokio::spawn(crate::reconciler::run(ctl.clone()));
    let storage = match cfg.ceph.clone() {
        Some(ceph) => {
            info!(
                conf = %ceph.conf.display(),
                id = %ceph.id,
                vm_client = ceph.vm_client.as_deref().unwrap_or("(none)"),
                "storage: when leading, this controller creates profiles' pools and volumes' images in Ceph"
            );
            Some(tokio::spawn(crate::storage::run(ctl.clone(), ceph)))
        }
        None => {
            info!("storage: no [ceph] section, so volumes and storage profiles are records only: nothing is created in Ceph");
            None
        }
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ClusterServiceServer<ClusterApi>>().await;
    health.set_serving::<AgentServiceServer<AgentApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(basalt_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    info!(node_id = cfg.node_id, listen = %cfg.listen, advertise = %cfg.advertise, "serving gRPC");

    // Set on SIGTERM/SIGINT: assignment streams end (agents move to another
    // controller) and the drain below starts.
    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    let signal = async {
        shutdown_signal().await;
        info!("stop signal: finishing open calls (at most {DRAIN:?})");
        stop_tx.send_replace(true);
    };
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ClusterServiceServer::new(ClusterApi { ctl: ctl.clone() }))
        .add_service(AgentServiceServer::new(AgentApi { ctl: ctl.clone(), stopping: stopping.clone() }))
        .add_service(
            RaftServiceServer::new(RaftRpc { ctl: ctl.clone() })
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    // tonic's graceful shutdown waits for every connection to close, with no
    // bound: a stream or a call that does not end would keep the process up.
    let mut stopped = stopping.clone();
    let drained = async move {
        if stopped.wait_for(|s| *s).await.is_ok() {
            tokio::time::sleep(DRAIN).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = serve => r?,
        _ = drained => warn!("connections still open {DRAIN:?} after the stop signal; closing them"),
    }

    info!("shutting down");
    reconciler.abort();
    // A Ceph call in progress goes on on the blocking pool until its own
    // timeout; main does not wait for it.
    if let Some(s) = storage {
        s.abort();
    }
    match tokio::time::timeout(RAFT_SHUTDOWN, raft.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("raft shutdown: {e}"),
        Err(_) => warn!("raft did not stop within {RAFT_SHUTDOWN:?}; exiting anyway"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            warn!("cannot watch SIGTERM ({e}); stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

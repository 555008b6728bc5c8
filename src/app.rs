//! Wiring for the `run` and `demo` commands: bind, serve, reload on SIGHUP, drain on
//! SIGTERM/SIGINT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::dns::{self, Resolve, SystemResolver};
use crate::snapshot::ProxyState;
use crate::{admin, echo, reload, server};

/// Why palisade could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid; one entry per problem.
    #[error("invalid configuration")]
    Config(Vec<config::ConfigError>),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Where it is set: `server.listen`, `server.tls`, `admin.listen`, ...
        setting: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the admin listener of `config`.
pub fn bind_admin(config: &Config) -> Result<TcpListener, StartError> {
    let addr = config.admin.listen;
    server::bind(addr).map_err(|source| StartError::Bind {
        addr,
        setting: "admin.listen",
        source,
    })
}

/// Binds every `server.listen` address of `config`.
pub fn bind_all(config: &Config) -> Result<Vec<TcpListener>, StartError> {
    config
        .server
        .listen
        .iter()
        .map(|&addr| {
            server::bind(addr).map_err(|source| StartError::Bind {
                addr,
                setting: "server.listen",
                source,
            })
        })
        .collect()
}

/// Binds every plain and every TLS listen address of `config`.
pub fn bind_listeners(config: &Config) -> Result<Vec<server::Listener>, StartError> {
    bind_listeners_from(config, &mut HashMap::new())
}

/// [`bind_listeners`], using the sockets a running palisade handed over where it had the
/// address ([`server::handover`]).
fn bind_listeners_from(
    config: &Config,
    inherited: &mut HashMap<server::handover::Key, std::net::TcpListener>,
) -> Result<Vec<server::Listener>, StartError> {
    let mut open = |addr: SocketAddr, tls: bool| -> Result<TcpListener, StartError> {
        let setting = if tls { "server.tls" } else { "server.listen" };
        let error = |source| StartError::Bind {
            addr,
            setting,
            source,
        };
        if let Some(listener) = inherited.remove(&(addr, tls)) {
            return TcpListener::from_std(listener).map_err(error);
        }
        server::bind(addr).map_err(error)
    };
    let mut listeners = Vec::new();
    for &addr in &config.server.listen {
        listeners.push(server::Listener::plain(open(addr, false)?));
    }
    let mut tls_addrs: Vec<std::net::SocketAddr> =
        config.server.tls.iter().map(|t| t.listen).collect();
    tls_addrs.sort();
    tls_addrs.dedup();
    for addr in tls_addrs {
        listeners.push(server::Listener {
            socket: open(addr, true)?,
            tls: Some(addr),
        });
    }
    Ok(listeners)
}

/// Serves `config` until SIGTERM or SIGINT, reloading it from its file on SIGHUP or
/// `POST /reload`. Returns once drained.
pub async fn run(config: Config) -> Result<(), StartError> {
    // Certificates must load before anything listens.
    crate::tls::build(&config).map_err(StartError::Config)?;
    // A running palisade on these addresses hands its listening sockets over: no
    // connection queued on them is lost when it stops.
    let mut inherited = server::handover::take_over(&config);
    let listeners = bind_listeners_from(&config, &mut inherited)?;
    // Sockets for addresses this config no longer has are closed here.
    drop(inherited);
    // Offered in turn from before this process says it is ready.
    let offers: Vec<_> = server::handover::names(&config)
        .into_iter()
        .map(server::handover::Offer::claim)
        .collect();
    let admin_listener = bind_admin(&config)?;
    // The addresses bound, not as written: port 0 becomes the port the kernel chose.
    for listener in &listeners {
        let addr = bound(&listener.socket);
        match listener.tls {
            None => tracing::info!(%addr, "listening"),
            Some(configured) => {
                for tls in config.server.tls.iter().filter(|t| t.listen == configured) {
                    tracing::info!(%addr, cert = %tls.cert.display(), "listening with TLS");
                }
            }
        }
    }
    tracing::info!(addr = %bound(&admin_listener), "admin API listening");
    let resolver: Arc<dyn Resolve> = Arc::new(SystemResolver);
    // Carried on by the refresh task: a name failing now is warned about once, not again
    // at its first refresh.
    let mut lookups = dns::Lookups::default();
    let resolved = lookups
        .resolve_all(resolver.as_ref(), &dns::names(&config), &Default::default())
        .await;
    let state = Arc::new(ProxyState::with_resolved(config, resolved));
    let sighup = tokio::spawn(reload_on_sighup(state.clone()));
    // Dropping the watcher stops it, so it lives as long as the server.
    let _watcher = match reload::watch_config_file(state.clone()) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
            None
        }
    };
    let dns_task = tokio::spawn(dns::refresh_from(state.clone(), resolver, lookups));
    let (admin_stop, admin_task) = spawn_admin_following(admin_listener, state.clone());
    crate::sdnotify::ready();
    let shutdown = async {
        shutdown_signal().await;
        crate::sdnotify::stopping();
    };
    server::serve_managed(listeners, state, offers, shutdown).await;
    sighup.abort();
    dns_task.abort();
    let _ = admin_stop.send(());
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The address `listener` is bound to, as logged.
fn bound(listener: &TcpListener) -> String {
    match listener.local_addr() {
        Ok(addr) => addr.to_string(),
        Err(e) => format!("(unknown: {e})"),
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops palisade");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reloads the config on every SIGHUP; a bad file keeps the running config.
async fn reload_on_sighup(state: Arc<ProxyState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot watch SIGHUP; reload by signal is off");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            let _ = reload::reload(&state);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = state;
    }
}

/// The demo's configuration: one route to three echo backends.
pub const DEMO_CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[admin]
listen = "127.0.0.1:9901"

[[routes]]
name = "demo"
path_prefix = "/"
upstream = "echo"

[upstreams.echo]
balance = "round_robin"
backends = [
  { addr = "127.0.0.1:9001" },
  { addr = "127.0.0.1:9002" },
  { addr = "127.0.0.1:9003" },
]

[upstreams.echo.health]
interval = "1s"
timeout = "500ms"
"#;

/// Runs the demo: three echo backends and the proxy in one process, until Ctrl-C.
pub async fn demo() -> Result<(), StartError> {
    let config = config::parse(DEMO_CONFIG, Path::new("<demo>")).map_err(StartError::Config)?;
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut backends = Vec::new();
    for (i, port) in (9001u16..=9003).enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = server::bind_exclusive(addr).map_err(|source| StartError::Bind {
            addr,
            setting: "the demo's echo backends",
            source,
        })?;
        let name: Arc<str> = format!("echo-{}", i + 1).into();
        let mut stop = stop_tx.subscribe();
        backends.push(tokio::spawn(echo::serve(listener, name, async move {
            let _ = stop.recv().await;
        })));
    }
    // Its fixed ports are taken alone: a second demo fails instead of sharing them.
    let exclusive = |addr: SocketAddr, setting: &'static str| {
        server::bind_exclusive(addr).map_err(|source| StartError::Bind {
            addr,
            setting,
            source,
        })
    };
    let listeners = config
        .server
        .listen
        .iter()
        .map(|&addr| exclusive(addr, "server.listen"))
        .collect::<Result<Vec<_>, _>>()?;
    let admin_listener = exclusive(config.admin.listen, "admin.listen")?;
    let state = Arc::new(ProxyState::new(config));
    let (admin_stop, admin_task) = spawn_admin(admin_listener, state.clone());
    println!("{}", demo_banner());
    server::serve(listeners, state, shutdown_signal()).await;
    let _ = admin_stop.send(());
    let _ = admin_task.await;
    let _ = stop_tx.send(());
    for b in backends {
        let _ = b.await;
    }
    Ok(())
}

/// A task and the sender that asks it to stop.
type Stoppable = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

/// Starts the admin API; it stays up while the proxy drains (so `/readyz` can say so) and
/// stops when the returned sender fires.
fn spawn_admin(listener: TcpListener, state: Arc<ProxyState>) -> Stoppable {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(admin::serve(listener, state, async {
        let _ = rx.await;
    }));
    (tx, task)
}

/// [`spawn_admin`], moving the admin API when a reload changes `admin.listen`: the new
/// address is bound first (while it cannot be, the old one stays, an error is logged and
/// the bind is tried again every [`server::REBIND_EVERY`]), then the old listener stops
/// accepting (its open connections finish).
fn spawn_admin_following(listener: TcpListener, state: Arc<ProxyState>) -> Stoppable {
    let (tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut addr = state.snapshot().config.admin.listen;
        let (mut current_stop, mut current) = spawn_admin(listener, state.clone());
        let mut changes = state.subscribe();
        // The address last logged as not bindable (logged once, not every retry).
        let mut unbound: Option<SocketAddr> = None;
        loop {
            let pending = state.snapshot().config.admin.listen != addr;
            tokio::select! {
                _ = &mut stop => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        let _ = (&mut stop).await;
                        break;
                    }
                }
                () = tokio::time::sleep(server::REBIND_EVERY), if pending => {}
            }
            let wanted = state.snapshot().config.admin.listen;
            if wanted == addr {
                continue;
            }
            match server::bind(wanted) {
                Ok(listener) => {
                    tracing::info!(addr = %bound(&listener), "admin listen address changed: listening");
                    let (next_stop, next) = spawn_admin(listener, state.clone());
                    let _ = std::mem::replace(&mut current_stop, next_stop).send(());
                    // The old one finishes on its own.
                    drop(std::mem::replace(&mut current, next));
                    addr = wanted;
                    unbound = None;
                }
                Err(e) => {
                    if unbound != Some(wanted) {
                        tracing::error!(
                            addr = %wanted, error = %e,
                            "cannot listen on the new admin address (trying again every second); the admin API stays on {addr}"
                        );
                        unbound = Some(wanted);
                    }
                }
            }
        }
        let _ = current_stop.send(());
        let _ = current.await;
    });
    (tx, task)
}

fn demo_banner() -> &'static str {
    r#"palisade demo is running:
  proxy          http://127.0.0.1:8080  (round robin over the three echo backends)
  admin          http://127.0.0.1:9901  (dashboard; /status, /metrics, /healthz, /readyz)
  echo backends  127.0.0.1:9001, 127.0.0.1:9002, 127.0.0.1:9003

Try:
  for i in 1 2 3 4 5 6; do curl -s 127.0.0.1:8080/hello | grep -o '"backend":"[^"]*"'; done
  curl -si 127.0.0.1:8080/status/503        # every backend answers 503: palisade retries the GET
                                            # on the other two (as its retry budget allows: about
                                            # one retry per 5 requests), then passes the last 503 on
  curl -s 127.0.0.1:9901/metrics | grep -E 'retries_total|code="503"'   # those retries
  curl -si 127.0.0.1:8080/delay/300         # answered after 300 ms
  curl -s  127.0.0.1:8080/bytes/1000000 | wc -c
  curl -sN 127.0.0.1:8080/stream/5          # five chunks, 100 ms apart
  curl -s --http2-prior-knowledge 127.0.0.1:8080/h2
  curl -s 127.0.0.1:9901/status             # backends, health, counters
  curl -s -XPOST 127.0.0.1:9002/health/down # fail echo-2's health check (passive/active failover)

Ctrl-C drains and stops."#
}

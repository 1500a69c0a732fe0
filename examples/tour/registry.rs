//! `--discovery etcd`: a single-member etcd in a temporary directory (`testkit::EtcdCluster`), the
//! backends announcing themselves in it (`Registration`, 2 s leases), and the balancer following
//! them (`Etcd`). A backend the tour stops leaves its lease to expire, as a crashed process would;
//! when the tour restarts it, it registers again.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use towline::BoxError;
use towline::backoff::{Backoff, Jitter};
use towline::discover::etcd::{Etcd, Registration};
use towline::testkit::{Backend, EtcdCluster, etcd_support};

/// The key prefix the backends register under.
pub const PREFIX: &str = "/towline/tour/";
/// How long a stopped backend's key outlives it.
pub const TTL: Duration = Duration::from_secs(2);

/// etcd and one registration per backend (`None` while the backend is stopped).
pub struct Registry {
    etcd: EtcdCluster,
    registrations: Mutex<Vec<Option<Registration>>>,
}

impl Registry {
    /// Starts etcd and registers every backend; a clear error when etcd is not installed.
    pub async fn start(backends: &[Backend]) -> Result<Registry, BoxError> {
        etcd_support().map_err(|why| {
            format!("--discovery etcd needs `etcd` and `etcdctl` on the PATH: {why}")
        })?;
        let etcd = EtcdCluster::start(1).await?;
        let mut registrations = Vec::new();
        for backend in backends {
            registrations.push(Some(register(&etcd, backend).await?));
        }
        Ok(Registry {
            etcd,
            registrations: Mutex::new(registrations),
        })
    }

    /// Where etcd listens.
    pub fn url(&self) -> String {
        self.etcd.urls().join(",")
    }

    /// The balancer's discovery: every endpoint registered under [`PREFIX`].
    pub fn discovery(&self) -> Result<Etcd, BoxError> {
        Ok(Etcd::builder(self.etcd.urls(), PREFIX).build()?)
    }

    /// Backend `i` is about to stop: its keepalives stop and its key expires within [`TTL`].
    pub fn crashed(&self, i: usize) {
        let registration = self.lock()[i].take();
        if let Some(registration) = registration {
            registration.abandon();
        }
    }

    /// Backend `i` is back: it registers again.
    pub async fn restarted(&self, i: usize, backend: &Backend) -> Result<(), BoxError> {
        let registration = register(&self.etcd, backend).await?;
        self.lock()[i] = Some(registration);
        Ok(())
    }

    /// Revokes every lease; etcd stops when the `Registry` is dropped.
    pub async fn deregister_all(&self) {
        let registrations: Vec<Registration> = self.lock().drain(..).flatten().collect();
        for registration in registrations {
            let _ = registration.deregister().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Registration>>> {
        self.registrations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

async fn register(etcd: &EtcdCluster, backend: &Backend) -> Result<Registration, BoxError> {
    // Reconnects well within the TTL, so a lease outlives a brief etcd hiccup.
    let backoff = Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(50),
        Duration::from_millis(500),
        2.0,
    )?;
    Ok(
        Registration::builder(etcd.urls(), PREFIX, backend.addr().to_string())
            .name(backend.id())
            .ttl(TTL)
            .backoff(backoff)
            .register()
            .await?,
    )
}

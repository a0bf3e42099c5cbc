//! Leadership among coordinators: several may follow one registry, one at a time leads.
//!
//! Only the leader forms groups and serves requests; the others stand by, and one of them
//! takes over when the leader's lease ends (it died, or it resigned on shutdown). With etcd
//! this is etcd's election API: each candidate campaigns with a key under a lease of its own,
//! and the candidate whose key is oldest leads, so leadership lasts exactly as long as that
//! lease. In memory (one process, `tessera up`) it is a single permit.

use std::future::Future;

use tokio::sync::OwnedSemaphorePermit;

use crate::error::Result;
use crate::lease::{LeaseLoss, Registration};

/// This process leads. Hold it while leading; [`Leadership::lost`] says when that ends.
#[derive(Debug)]
pub struct Leadership {
    candidate: String,
    hold: Hold,
}

#[derive(Debug)]
enum Hold {
    /// The election key lives under this lease: losing the lease loses leadership.
    Lease(Registration),
    /// The in-memory election's one permit.
    Permit(OwnedSemaphorePermit),
}

impl Leadership {
    pub(crate) fn under_lease(candidate: String, lease: Registration) -> Self {
        Self { candidate, hold: Hold::Lease(lease) }
    }

    pub(crate) fn with_permit(candidate: String, permit: OwnedSemaphorePermit) -> Self {
        Self { candidate, hold: Hold::Permit(permit) }
    }

    /// The name this process campaigned under.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// Resolves when leadership ends without a resignation, with the reason; another
    /// candidate may lead from then on, so the holder must stop acting as leader at once.
    pub fn lost(&self) -> impl Future<Output = LeaseLoss> + Send + 'static {
        let lease_lost = match &self.hold {
            Hold::Lease(lease) => Some(lease.lost()),
            Hold::Permit(_) => None,
        };
        async move {
            match lease_lost {
                Some(lost) => lost.await,
                // Nothing outside this process can take an in-memory permit away.
                None => std::future::pending().await,
            }
        }
    }

    /// Steps down now, so the next candidate leads without waiting out the lease.
    pub async fn resign(self) -> Result<()> {
        match self.hold {
            Hold::Lease(lease) => lease.revoke().await,
            Hold::Permit(permit) => {
                drop(permit);
                Ok(())
            }
        }
    }
}

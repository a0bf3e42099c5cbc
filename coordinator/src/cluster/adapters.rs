//! LoRA adapters on the groups: every rank of a group loads an adapter (its share of it) before
//! the group's first request with it, and forgets it when it is unloaded.

use tessera_proto::worker as wpb;

use super::{group_name, Cluster};
use crate::adapters::AdapterEntry;
use crate::error::{invalid, CoordinatorError};
use crate::fanout::{on_every_rank, Rank};

impl Cluster {
    /// The serving groups of model `model` by name, with their ranks in rank order; only `group`
    /// when given.
    fn serving_ranks(&self, model: usize, group: Option<&str>) -> Vec<(String, Vec<Rank>)> {
        let state = self.lock();
        state
            .groups
            .iter()
            .filter(|(id, g)| g.model == model && g.serving.is_some() && group.is_none_or(|name| group_name(**id) == name))
            .filter_map(|(id, g)| {
                let ranks = g
                    .workers
                    .iter()
                    .map(|w| state.workers.get(w).map(|e| Rank { id: w.clone(), client: e.client.clone() }))
                    .collect::<Option<Vec<_>>>()?;
                Some((group_name(*id), ranks))
            })
            .collect()
    }

    /// Has every rank of `group` (of model `model`) load `adapter`, unless it did already; a
    /// worker's refusal (the adapter does not fit the model) comes back as `INVALID_ARGUMENT`
    /// with its reason.
    pub(crate) async fn load_adapter_on(&self, model: usize, group: &str, adapter: &AdapterEntry) -> Result<(), CoordinatorError> {
        if adapter.is_loaded_on(group) {
            return Ok(());
        }
        for (name, ranks) in self.serving_ranks(model, Some(group)) {
            load_on_ranks(&name, &ranks, adapter, self.config.load_timeout).await?;
            adapter.mark_loaded(&name);
        }
        Ok(())
    }

    /// [`Cluster::load_adapter_on`] every serving group of `model`; returns how many.
    pub(crate) async fn load_adapter_everywhere(&self, model: usize, adapter: &AdapterEntry) -> Result<usize, CoordinatorError> {
        let groups = self.serving_ranks(model, None);
        for (name, ranks) in &groups {
            load_on_ranks(name, ranks, adapter, self.config.load_timeout).await?;
            adapter.mark_loaded(name);
        }
        Ok(groups.len())
    }

    /// Tells every rank of `model`'s serving groups to forget adapter `name`; a rank that does
    /// not answer is logged (it drops the adapter with its group, or evicts it in time).
    pub(crate) async fn unload_adapter_everywhere(&self, model: usize, name: &str) {
        for (group, ranks) in self.serving_ranks(model, None) {
            let results = on_every_rank(&ranks, |rank| {
                let mut client = rank.client.clone();
                let request = wpb::UnloadAdapterRequest { group_id: group.clone(), name: name.to_string() };
                async move { client.unload_adapter(request).await }
            })
            .await;
            for (rank, result) in ranks.iter().zip(results) {
                if let Err(status) = result {
                    tracing::warn!(group, worker = %rank.id, adapter = name, error = %status.message(), "unloading an adapter failed");
                }
            }
        }
    }
}

async fn load_on_ranks(group: &str, ranks: &[Rank], adapter: &AdapterEntry, timeout: std::time::Duration) -> Result<(), CoordinatorError> {
    let results = on_every_rank(ranks, |rank| {
        let mut client = rank.client.clone();
        let request = wpb::LoadAdapterRequest { group_id: group.to_string(), adapter: Some(adapter.wire()) };
        async move {
            match tokio::time::timeout(timeout, client.load_adapter(request)).await {
                Ok(answer) => answer,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer in {timeout:?}"))),
            }
        }
    })
    .await;
    for (rank, result) in ranks.iter().zip(results) {
        match result {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::InvalidArgument => return Err(invalid(status.message().to_string())),
            Err(status) => {
                return Err(CoordinatorError::Unavailable(format!(
                    "worker {} of group {group} could not load adapter {:?}: {}",
                    rank.id,
                    adapter.name,
                    status.message()
                )))
            }
        }
    }
    tracing::info!(group, adapter = %adapter.name, "adapter loaded on the group");
    Ok(())
}

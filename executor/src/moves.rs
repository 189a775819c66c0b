//! A migration, as its destination drives it (`ARCHITECTURE.md`, "Live
//! migration", steps 2 and 4): pull a tenant from its source while it runs,
//! then take the final round and publish it.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::api::FunctionInfo;
use tensor_wasm_shared::snapshot::stream::{Reader, StreamKind};

use crate::assets::StagedAsset;
use crate::error::ExecError;
use crate::inbound::{Applied, Blobs, Inbound};
use crate::peer::{BodyStream, Peer, PeerError};
use crate::registry::Registry;
use crate::state::AssetSource;

/// Largest stream a round may be: every byte a tenant can hold, and then
/// some (8 GiB, as an import).
pub const MAX_ROUND_BYTES: u64 = crate::snapshot::MAX_SNAPSHOT_BYTES;

/// How a pull decides it has copied enough while the tenant runs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PullOptions {
    /// Most rounds before the final one: 8.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// A round this small (bytes) is the last before the final one: 1 MiB.
    #[serde(default = "default_converged")]
    pub converged_bytes: u64,
}

fn default_rounds() -> u32 {
    8
}

fn default_converged() -> u64 {
    1 << 20
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            max_rounds: default_rounds(),
            converged_bytes: default_converged(),
        }
    }
}

/// What a pull did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PullReport {
    /// Bytes of modules and assets files fetched.
    pub blob_bytes: u64,
    /// How long fetching them and staging the functions took.
    #[serde(default)]
    pub blob_ms: f64,
    pub rounds: Vec<RoundReport>,
    pub ms: f64,
}

/// One round as the destination saw it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    #[serde(flatten)]
    pub applied: Applied,
    pub ms: f64,
}

/// The session manifest a source answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub session: String,
    pub tenant: String,
    /// How the source tracks written pages.
    pub page_tracking: String,
    pub functions: Vec<FunctionInfo>,
}

fn peer_error(e: PeerError) -> ExecError {
    match e.code() {
        Some(tensor_wasm_shared::ErrorCode::TenantNotHere) => {
            ExecError::TenantNotHere(e.to_string())
        }
        _ => ExecError::Capacity(format!("the source: {e}")),
    }
}

/// Applies the stream `body` to `inbound` on the blocking pool.
async fn apply_stream(
    registry: &Arc<Registry>,
    inbound: &Arc<Inbound>,
    body: BodyStream,
    kinds: &'static [StreamKind],
    blobs: Box<dyn Blobs + Send>,
) -> Result<Applied, ExecError> {
    let (tx, reader) = crate::pipe::chunk_reader();
    let feeding = tokio::spawn(crate::peer::forward(body, tx));
    let (r, i) = (registry.clone(), inbound.clone());
    let key = registry.snapshot_key().map(<[u8]>::to_vec);
    let applied = tokio::task::spawn_blocking(move || {
        let mut blobs = blobs;
        let mut reader =
            Reader::new(reader, key.as_deref(), MAX_ROUND_BYTES).map_err(ExecError::Snapshot)?;
        let applied = i.apply(&r, &mut reader, kinds, blobs.as_mut())?;
        // What it brought goes to this executor's journal as it comes.
        let written = i.journal_staged(&r)?;
        Ok::<_, ExecError>((applied, written))
    })
    .await
    .map_err(ExecError::task("round"))?;
    feeding.abort();
    let (applied, written) = applied?;
    inbound.staged_durable(written).await?;
    Ok(applied)
}

/// Step 2: stages `tenant` from `peer`'s session `session`, while the
/// tenant runs there: its functions, then rounds until one is small.
pub async fn pull(
    registry: &Arc<Registry>,
    peer: Peer,
    tenant: &TenantId,
    session: &str,
    options: PullOptions,
) -> Result<PullReport, ExecError> {
    let started = Instant::now();
    let manifest: Manifest =
        serde_json::from_slice(&peer.manifest(session).await.map_err(peer_error)?)
            .map_err(|e| ExecError::Capacity(format!("the source's manifest: {e}")))?;
    if manifest.tenant != tenant.as_str() {
        return Err(ExecError::InvalidInput(format!(
            "session {session} moves tenant {}, not {tenant}",
            manifest.tenant
        )));
    }
    let inbound = registry
        .start_inbound(tenant, Some((peer.clone(), session.to_string())), false)
        .await?;
    let result = pull_into(
        registry, &inbound, &peer, tenant, session, manifest, options,
    )
    .await;
    if result.is_err() {
        registry.discard_inbound(tenant).await;
    }
    let mut report = result?;
    report.ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

async fn pull_into(
    registry: &Arc<Registry>,
    inbound: &Arc<Inbound>,
    peer: &Peer,
    tenant: &TenantId,
    session: &str,
    manifest: Manifest,
    options: PullOptions,
) -> Result<PullReport, ExecError> {
    let started = Instant::now();
    let mut report = PullReport::default();
    // Fetched files sync to disk while the rounds copy; the pull ends once
    // they are on disk, before the tenant can move here.
    let mut syncs = Vec::new();
    for info in manifest.functions {
        let (blobs, bytes) = fetch(registry, peer, tenant, &info, &mut syncs).await?;
        report.blob_bytes += bytes;
        let (registry, inbound) = (registry.clone(), inbound.clone());
        tokio::task::spawn_blocking(move || {
            let mut blobs = blobs;
            inbound.stage_function(&registry, info, &mut blobs)
        })
        .await
        .map_err(ExecError::task("staging a function"))??;
    }
    report.blob_ms = started.elapsed().as_secs_f64() * 1e3;
    for i in 0..options.max_rounds.max(1) {
        let t0 = Instant::now();
        let body = peer.round(session).await.map_err(peer_error)?;
        let applied = apply_stream(
            registry,
            inbound,
            body,
            &[StreamKind::Round],
            Box::new(Fetched::default()),
        )
        .await?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(%tenant, round = i, bytes = applied.bytes, ms, "round pulled");
        report.rounds.push(RoundReport { applied, ms });
        if i > 0 && applied.bytes <= options.converged_bytes {
            break;
        }
    }
    if !syncs.is_empty() {
        for sync in syncs {
            synced(sync).await?;
        }
        // The fetched files' names, renamed into the store while staging.
        let (store, t) = (registry.asset_store().clone(), tenant.to_string());
        tokio::task::spawn_blocking(move || store.sync_dir(&t))
            .await
            .map_err(ExecError::task("syncing assets"))??;
    }
    Ok(report)
}

/// Step 4: takes the final round from the source (which freezes the
/// tenant), applies it, and publishes the tenant here. Pending jobs start.
pub async fn commit(registry: &Arc<Registry>, tenant: &TenantId) -> Result<RoundReport, ExecError> {
    let t0 = Instant::now();
    let inbound = registry
        .inbound(tenant)
        .ok_or_else(|| ExecError::MoveNotFound(format!("an inbound move of tenant {tenant}")))?;
    let Some((peer, session)) = inbound.origin.clone() else {
        return Err(ExecError::Internal(
            "an import has no source to commit from".into(),
        ));
    };
    let body = peer.final_round(&session).await.map_err(peer_error)?;
    let blobs = PeerBlobs {
        peer: peer.clone(),
        registry: registry.clone(),
        tenant: tenant.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let applied = apply_stream(
        registry,
        &inbound,
        body,
        &[StreamKind::Final],
        Box::new(blobs),
    )
    .await;
    let applied = match applied {
        Ok(a) => a,
        Err(e) => {
            registry.discard_inbound(tenant).await;
            return Err(e);
        }
    };
    // From here on the source is not needed: what it sent is checked
    // (its End verified) and staged here.
    tracing::info!(%tenant, bytes = applied.bytes, "final round received");
    let (r, i) = (registry.clone(), inbound.clone());
    let pending = tokio::task::spawn_blocking(move || i.commit(&r, false))
        .await
        .map_err(ExecError::task("commit"))?;
    let pending = match pending {
        Ok(p) => p,
        Err(e) => {
            registry.discard_inbound(tenant).await;
            return Err(e);
        }
    };
    for job in pending {
        registry.spawn_job(inbound.tenant.clone(), job);
    }
    Ok(RoundReport {
        applied,
        ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// A function's module, and its assets file unless the tenant's store here
/// has it, fetched from the source; the bytes fetched. The sync of a
/// fetched file to disk goes on in `syncs`.
async fn fetch(
    registry: &Arc<Registry>,
    peer: &Peer,
    tenant: &TenantId,
    info: &FunctionInfo,
    syncs: &mut Vec<FileSync>,
) -> Result<(Fetched, u64), ExecError> {
    let wasm = peer
        .module(tenant, info.id.as_str())
        .await
        .map_err(peer_error)?;
    let mut bytes = wasm.len() as u64;
    let assets = match &info.assets_sha256 {
        Some(sha) if registry.asset_store().contains(tenant.as_str(), sha) => {
            Some(AssetSource::Stored(sha.clone()))
        }
        Some(sha) => {
            let (staged, sync) = fetch_assets(registry, peer, tenant, sha).await?;
            syncs.push(sync);
            bytes += staged.len;
            Some(AssetSource::Staged(staged))
        }
        None => None,
    };
    Ok((
        Fetched {
            wasm: Some(wasm.to_vec()),
            assets,
        },
        bytes,
    ))
}

/// A fetched file's sync to disk, under way.
type FileSync = tokio::task::JoinHandle<std::io::Result<()>>;

/// Waits for `sync`.
async fn synced(sync: FileSync) -> Result<(), ExecError> {
    sync.await
        .map_err(ExecError::task("syncing assets"))?
        .map_err(|e| ExecError::Internal(format!("syncing a fetched assets file: {e}")))
}

/// Streams the source's assets file `sha256` into the store here,
/// checking that the bytes hash to their name; with it, the sync of the
/// file to disk, under way.
async fn fetch_assets(
    registry: &Arc<Registry>,
    peer: &Peer,
    tenant: &TenantId,
    sha256: &str,
) -> Result<(StagedAsset, FileSync), ExecError> {
    let (blake3, body) = peer.assets(tenant, sha256).await.map_err(peer_error)?;
    let cap = registry.quotas.asset_cap();
    // The source's digest, recorded when the file was stored, is checked
    // with BLAKE3 instead of recomputing the SHA-256 (a third of the
    // cost); a file stored by an older release is checked by its name.
    let store = registry.asset_store();
    let up = match &blake3 {
        Some(b3) => store.upload_vouched(tenant.as_str(), cap, sha256, b3)?,
        None => store.upload(tenant.as_str(), cap)?,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(crate::pipe::CHUNKS_IN_FLIGHT);
    let feeding = tokio::spawn(crate::peer::forward(body, tx));
    let written = tokio::task::spawn_blocking(move || {
        let mut up = up;
        up.hash_aside()?;
        while let Some(chunk) = rx.blocking_recv() {
            let chunk: bytes::Bytes = chunk.map_err(|e| {
                ExecError::Capacity(format!("fetching assets from the source: {e}"))
            })?;
            up.write_bytes(chunk)?;
        }
        Ok::<_, ExecError>(up.finish_unsynced()?)
    })
    .await
    .map_err(ExecError::task("fetching assets"));
    feeding.abort();
    let (staged, file) = written??;
    if staged.sha256 != sha256 {
        return Err(ExecError::InvalidInput(format!(
            "assets {sha256} arrived as {}",
            staged.sha256
        )));
    }
    Ok((staged, tokio::task::spawn_blocking(move || file.sync_all())))
}

/// A function's blobs fetched before staging it.
#[derive(Default)]
struct Fetched {
    wasm: Option<Vec<u8>>,
    assets: Option<AssetSource>,
}

impl Blobs for Fetched {
    fn module(&mut self, info: &FunctionInfo) -> Result<Vec<u8>, ExecError> {
        self.wasm
            .take()
            .ok_or_else(|| ExecError::Internal(format!("no module fetched for {}", info.id)))
    }

    fn assets(&mut self, sha256: &str) -> Result<AssetSource, ExecError> {
        self.assets
            .take()
            .ok_or_else(|| ExecError::Internal(format!("no assets fetched: {sha256}")))
    }
}

/// Blobs fetched from the source on demand, for functions registered
/// there during the pull (the final round names them). Blocking: it runs
/// the fetch on the runtime from the applying thread.
struct PeerBlobs {
    peer: Peer,
    registry: Arc<Registry>,
    tenant: TenantId,
    runtime: tokio::runtime::Handle,
}

impl Blobs for PeerBlobs {
    fn module(&mut self, info: &FunctionInfo) -> Result<Vec<u8>, ExecError> {
        self.runtime
            .block_on(self.peer.module(&self.tenant, info.id.as_str()))
            .map(|b| b.to_vec())
            .map_err(peer_error)
    }

    fn assets(&mut self, sha256: &str) -> Result<AssetSource, ExecError> {
        if self
            .registry
            .asset_store()
            .contains(self.tenant.as_str(), sha256)
        {
            return Ok(AssetSource::Stored(sha256.to_string()));
        }
        self.runtime.block_on(async {
            let (staged, sync) =
                fetch_assets(&self.registry, &self.peer, &self.tenant, sha256).await?;
            synced(sync).await?;
            Ok(AssetSource::Staged(staged))
        })
    }
}

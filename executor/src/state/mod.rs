//! The executor's mutable state, one owner per part.
//!
//! ```text
//! Registry (registry.rs)                  tenants: TenantId → Arc<Tenant>
//! │   store: FunctionStore (store.rs)     the state directory's functions/
//! │   job_slots                           executor-wide job concurrency
//! │   cpu: CpuShares (cpu.rs)             the cores and the tenants' use
//! └── Tenant (tenant.rs)
//!     ├── cpu: TenantCpu                  its recent use of the cores
//!     ├── gate: Admission                 frozen?, work admitted and not done
//!     ├── instances: InstanceCount        live warm instances of the tenant
//!     ├── jobs: JobTable (jobs.rs)        records + the tenant's jobs in flight
//!     ├── job_permits, running, uploads   its shares: jobs running, guests
//!     │                                   running, assets uploads at once
//!     └── functions: id → Arc<Function> (function.rs)
//!         ├── config: ResolvedConfig      limits applied, no `Option`s
//!         └── pool: Pool (pool.rs)        instance slots, idle instances,
//!                                         queued invocations
//! ```
//!
//! Each part changes only through its owner's methods, and the counters that
//! must agree live with the state they count:
//!
//! - **Admission** ([`Tenant::admit`]): `inflight` is the number of live
//!   [`Inflight`] guards. Freezing takes the same lock, so once
//!   [`Tenant::freeze`] returns no new work starts, and
//!   [`Tenant::wait_drained`] sees every unit that did. A unit is whatever
//!   changes what an export captures: an invocation, a running job, a
//!   checkpoint pass, and each of the tenant's own changes (a function
//!   registered or deleted, a job accepted or forgotten), held until it is
//!   done. So a snapshot holds every change answered before it, and none
//!   is answered after it.
//! - **Instances** ([`InstanceCount`]): a tenant's count is the number of
//!   live [`InstanceClaim`]s; every warm instance holds one, so the count is
//!   the number of the tenant's instances, idle or running, and it cannot
//!   drift. The executor-wide figure is the sum over tenants, computed when
//!   read, never stored.
//! - **Pool slots** ([`Pool`]): an instance leaves the idle list only to a
//!   holder of one of the pool's `max_instances` slots, and a new instance
//!   is made only when the idle list is empty, so a function has at most
//!   `max_instances` instances. (Not structural: an import puts back every
//!   instance its snapshot holds, which may be more if the destination's
//!   limits are lower; the surplus is never outnumbered by slots and is
//!   dropped as it dies.)
//! - **Queued invocations** ([`Pool::submit`]): a queued invocation is
//!   owned by whoever moves its state out of "queued" first, the slot that
//!   runs it or its caller giving up, so it runs at most once; `waiting`
//!   counts those still queued. A slot given up while the queue holds any
//!   goes on to run them, unless a caller of the semaphore waits, so the
//!   queue never sits behind a free slot.
//! - **Jobs** ([`JobTable`]): `in_flight` counts the table's unfinished
//!   (pending or running) jobs. Only the table's methods change a record's
//!   status, and each moves the count with it; a job finishes exactly once.
//!   The executor-wide figure is again a sum over tenants, so dropping a
//!   tenant takes its jobs out of it with nothing to subtract.
//!
//! What comes next fits here: change tracking of memory pages and tensors
//! belongs to the pool's instances, checkpoints read a tenant through its
//! [`Tenant::freeze`] gate and write through the [`FunctionStore`]'s
//! write-then-rename, and streaming invocations hold a slot and an
//! [`Inflight`] guard like any other call.

pub mod cpu;
mod function;
mod jobs;
mod pool;
mod store;
mod tenant;

pub use function::{
    AssetSource, Function, MAX_CHECKPOINT, MIN_CHECKPOINT, Registration, ResolvedConfig,
};
pub use jobs::{JobCaps, JobRecord, JobTable};
pub use pool::{InstanceClaim, InstanceCount, Pool, PooledInstance, QueuedRun, Slot, Ticket};
pub use store::{FunctionStore, PersistedFunction};
pub use tenant::{Inflight, Tenant};

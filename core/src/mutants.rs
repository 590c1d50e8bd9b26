//! Planted bugs that the simulator's checkers must catch. Compiled only with the
//! `mutants` feature (gallocy-sim turns it on) and inert unless one is selected in
//! `Config::mutant`.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mutant {
    /// The home grants write access without invalidating the readers.
    GrantWriteWithoutInvalidate,
    /// A reader acknowledges an invalidation before its application lost access.
    AckInvalidateBeforeRevoke,
    /// A node installs a grant older than an invalidation it already processed.
    AcceptStaleGrant,
    /// The home forgets to bump the page version on a write grant, so a stale copy
    /// looks current and is upgraded in place.
    SkipVersionBump,
    /// The lease state machine hands out chunks already leased to another node.
    DoubleLease,
    /// A node carves an allocation from a chunk it has only proposed to lease.
    ReplyBeforeCommit,
    /// The host tells the node a revocation is done before the processes answered.
    RevokeDoneBeforeProcessAnswered,
    /// The host treats a process whose Main or Service connection closed as holding
    /// nothing, though it may still map the space with its access.
    ForgetClosedSessionAccess,
    /// The host sends a revocation while a grant of the page is still being applied by
    /// the process, so the grant's mprotect can land after the revocation's.
    RevokeDespiteGrantInFlight,
    /// The host leaves a space's attach set while a process of it is still detaching
    /// or being killed, so the space can be destroyed under it.
    LeaveSpaceWhileProcessEnding,
    /// A node acknowledges a released run before its processes gave the pages up and
    /// its memory of them was zeroed, so the run can be leased again under them.
    AckReleaseBeforePagesDropped,
    /// The host lets a futex wait sleep without comparing the word, so a wait that
    /// arrives after the write (and its wake) sleeps on.
    FutexWaitSkipsCompare,
    /// A futex wake wakes waiters of its own node only, so a waiter on another node
    /// sleeps on after the write it waits for.
    FutexWakeSkipsPeers,
    /// A futex wake goes to the other nodes once, never resent, and is answered at
    /// once: a lost message loses the wake-up.
    FutexRemoteWakeNotRetried,
    /// The spawner answers a thread spawn at once and sends it once, without waiting
    /// for the target to acknowledge delivery: a lost message loses the thread.
    SpawnNotRetried,
    /// The target runs every copy of a retried spawn it receives, so a thread whose
    /// acknowledgement was lost runs twice.
    SpawnNotDeduplicated,
    /// The new home of a recovered page rebuilds it from the oldest surviving copy
    /// instead of the newest, losing writes that survivors saw.
    RecoverFromOldestCopy,
    /// The new home of a recovered page ignores a surviving writer, so it grants the
    /// page to others while that node can still write it.
    RecoverIgnoresWriter,
    /// The home acknowledges a flush (and grants a page) before the backups it sent
    /// have the bytes: a synced or shared write can be on fewer than k nodes.
    AckBeforeBackup,
    /// The new home of a recovered page ignores the backup copies nodes keep, so a
    /// synced write whose writer and home both went down is lost.
    RecoverIgnoresBackups,
    /// A home forgets the copies a node marked down took (no repair), so a page can
    /// stay on fewer than k nodes until the next loss takes it.
    SkipRepairs,
}

impl Mutant {
    pub const ALL: [Mutant; 21] = [
        Mutant::GrantWriteWithoutInvalidate,
        Mutant::AckInvalidateBeforeRevoke,
        Mutant::AcceptStaleGrant,
        Mutant::SkipVersionBump,
        Mutant::DoubleLease,
        Mutant::ReplyBeforeCommit,
        Mutant::RevokeDoneBeforeProcessAnswered,
        Mutant::ForgetClosedSessionAccess,
        Mutant::RevokeDespiteGrantInFlight,
        Mutant::LeaveSpaceWhileProcessEnding,
        Mutant::AckReleaseBeforePagesDropped,
        Mutant::FutexWaitSkipsCompare,
        Mutant::FutexWakeSkipsPeers,
        Mutant::FutexRemoteWakeNotRetried,
        Mutant::SpawnNotRetried,
        Mutant::SpawnNotDeduplicated,
        Mutant::RecoverFromOldestCopy,
        Mutant::RecoverIgnoresWriter,
        Mutant::AckBeforeBackup,
        Mutant::RecoverIgnoresBackups,
        Mutant::SkipRepairs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::GrantWriteWithoutInvalidate => "grant-write-without-invalidate",
            Mutant::AckInvalidateBeforeRevoke => "ack-invalidate-before-revoke",
            Mutant::AcceptStaleGrant => "accept-stale-grant",
            Mutant::SkipVersionBump => "skip-version-bump",
            Mutant::DoubleLease => "double-lease",
            Mutant::ReplyBeforeCommit => "reply-before-commit",
            Mutant::RevokeDoneBeforeProcessAnswered => "revoke-done-before-process-answered",
            Mutant::ForgetClosedSessionAccess => "forget-closed-session-access",
            Mutant::RevokeDespiteGrantInFlight => "revoke-despite-grant-in-flight",
            Mutant::LeaveSpaceWhileProcessEnding => "leave-space-while-process-ending",
            Mutant::AckReleaseBeforePagesDropped => "ack-release-before-pages-dropped",
            Mutant::FutexWaitSkipsCompare => "futex-wait-skips-compare",
            Mutant::FutexWakeSkipsPeers => "futex-wake-skips-peers",
            Mutant::FutexRemoteWakeNotRetried => "futex-remote-wake-not-retried",
            Mutant::SpawnNotRetried => "spawn-not-retried",
            Mutant::SpawnNotDeduplicated => "spawn-not-deduplicated",
            Mutant::RecoverFromOldestCopy => "recover-from-oldest-copy",
            Mutant::RecoverIgnoresWriter => "recover-ignores-writer",
            Mutant::AckBeforeBackup => "ack-before-backup",
            Mutant::RecoverIgnoresBackups => "recover-ignores-backups",
            Mutant::SkipRepairs => "skip-repairs",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Mutant::GrantWriteWithoutInvalidate => {
                "home grants write access without invalidating readers"
            }
            Mutant::AckInvalidateBeforeRevoke => {
                "reader acks an invalidation before its application lost access"
            }
            Mutant::AcceptStaleGrant => "node installs a grant older than a processed invalidation",
            Mutant::SkipVersionBump => "home does not bump the version on a write grant",
            Mutant::DoubleLease => "lease state machine leases a chunk held by another node",
            Mutant::ReplyBeforeCommit => {
                "node allocates from a chunk lease before the Raft entry commits"
            }
            Mutant::RevokeDoneBeforeProcessAnswered => {
                "host reports a revocation done before the processes applied it"
            }
            Mutant::ForgetClosedSessionAccess => {
                "host forgets the access of a process whose main connection closed"
            }
            Mutant::RevokeDespiteGrantInFlight => {
                "host revokes a page while a grant of it is still being applied"
            }
            Mutant::LeaveSpaceWhileProcessEnding => {
                "host leaves a space while a process of it is still detaching or dying"
            }
            Mutant::AckReleaseBeforePagesDropped => {
                "node acknowledges a released run before its processes gave the pages up"
            }
            Mutant::FutexWaitSkipsCompare => {
                "host lets a futex wait sleep without comparing the word"
            }
            Mutant::FutexWakeSkipsPeers => "futex wake wakes waiters of its own node only",
            Mutant::FutexRemoteWakeNotRetried => {
                "futex wake is sent to other nodes once, never resent"
            }
            Mutant::SpawnNotRetried => "spawner answers a thread spawn before it was delivered",
            Mutant::SpawnNotDeduplicated => "target runs every copy of a retried thread spawn",
            Mutant::RecoverFromOldestCopy => {
                "new home rebuilds a recovered page from the oldest surviving copy"
            }
            Mutant::RecoverIgnoresWriter => {
                "new home rebuilds a recovered page ignoring the node that writes it"
            }
            Mutant::AckBeforeBackup => {
                "home acknowledges a flush or grants a page before its backups have the bytes"
            }
            Mutant::RecoverIgnoresBackups => {
                "new home rebuilds a recovered page ignoring the backup copies"
            }
            Mutant::SkipRepairs => "home never makes again the copies a node marked down took",
        }
    }

    pub fn from_name(name: &str) -> Option<Mutant> {
        Mutant::ALL.into_iter().find(|m| m.name() == name)
    }
}

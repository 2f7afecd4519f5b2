//! Redis backend: the same GCRA as `meshwarden_shared::ratelimit`, transcribed into Lua and run
//! atomically server-side, with Redis's own clock (`TIME`) so that every sidecar replica agrees.
//!
//! Key layout (Redis Cluster compatible): everything of one budget key lives in one hash slot thanks
//! to the hash tag `{...}`:
//! - `mw:tl:{<key>}:w` - a hash, field `<window_ms>:<limit>` -> tat (µs);
//! - `mw:tl:{<key>}:c` - a sorted set of concurrency leases, score = expiry (µs);
//! - `mw:tl:{<key>}:s:<id>` - a settlement id already applied (expires after the item's `id_ttl_ms`).
//!
//! A Redis Cluster is found by asking the server given (`INFO cluster`): the sidecar then speaks the
//! cluster protocol (slots learned from the node, each script sent to the node holding its keys,
//! `MOVED`/`ASK` followed), so any node's URL, or a managed service's configuration endpoint, serves
//! every key. Through a single connection, the keys of the other nodes' slots were answered `MOVED`.
//!
//! A request with several budget keys (team total + per-model) reserves key by key, each atomically,
//! and rolls back the keys already reserved when a later one denies (all-or-nothing from the caller's
//! view; no script touches two slots). Keys expire once their state equals "never seen".
//!
//! `rediss://` connects with TLS and checks the server's certificate against the system's CA
//! certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` name others; `#insecure` at the end of the URL skips
//! the check).
//!
//! The scripts only compare, add and store integers computed in Rust by the shared GCRA (field names,
//! window lengths and costs in µs) and return the state they read; the answer is computed in Rust from
//! it, so it is the memory backend's to the token. Every number stays below 2^53 (costs and debts are
//! capped at `MAX_AHEAD_US` from now), where Lua's doubles are exact.

use meshwarden_shared::ratelimit::{
    reserve, reserved, rollback_item, DenyReason, Group, GroupResult, ReserveRequest, ReserveResponse, SettleItem,
    MAX_AHEAD_US,
};
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::Script;
use std::time::Duration;
use tokio::sync::Mutex;

// The scripts only compare, add and store integers the sidecar computed with the shared GCRA (each
// window's field name, length and cost in µs); the answer (remaining, reset, retry-after, never) is
// computed in Rust from the state the script read and Redis's clock. Every number stays below 2^53
// (`MAX_AHEAD_US`), where Lua's doubles are exact: memory and Redis answer the same.
//
// Reserve: ARGV = nwin, cmax (0: no concurrency limit), lease id, lease µs, then per window: field,
// window µs, cost µs. Answer: {allowed, reason (1 tokens, 2 concurrency), now, tat of each window}.
const RESERVE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nwin = tonumber(ARGV[1])
local cmax = tonumber(ARGV[2])
local lease = ARGV[3]
local lease_us = tonumber(ARGV[4])
if cmax > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZSCORE', KEYS[2], lease) == false and redis.call('ZCARD', KEYS[2]) >= cmax then
    return {0, 2, now}
  end
end
local out = {1, 0, now}
local news = {}
local allowed = true
local maxttl = 0
for i = 1, nwin do
  local field = ARGV[2 + 3 * i]
  local wus = tonumber(ARGV[3 + 3 * i])
  local c = tonumber(ARGV[4 + 3 * i])
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  table.insert(out, tat)
  local new = math.max(tat, now) + c
  news[i] = new
  if new - wus > now then allowed = false end
  if new - now > maxttl then maxttl = new - now end
end
if not allowed then
  out[1] = 0; out[2] = 1
  return out
end
for i = 1, nwin do
  redis.call('HSET', KEYS[1], ARGV[2 + 3 * i], string.format('%.0f', news[i]))
end
if nwin > 0 then
  local ttl = math.ceil(maxttl / 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
if cmax > 0 then
  redis.call('ZADD', KEYS[2], string.format('%.0f', now + lease_us), lease)
  local lttl = math.ceil(lease_us / 1000) + 1000
  if redis.call('PTTL', KEYS[2]) < lttl then redis.call('PEXPIRE', KEYS[2], lttl) end
end
return out
"#;

// Settle: ARGV = direction (1 debt, -1 refund, 0 none), nwin, lease id to release ('' none), id ttl ms,
// the debt cap in µs (`MAX_AHEAD_US`), then per window: field, cost µs of |delta|.
const SETTLE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local dir = tonumber(ARGV[1])
local nwin = tonumber(ARGV[2])
local lease = ARGV[3]
local id_ttl = tonumber(ARGV[4])
local cap = tonumber(ARGV[5])
local maxttl = 0
-- A settlement with an id is applied once: a resend (its first call failed or timed out after it was
-- applied) finds the id's key and leaves the budget alone.
if dir ~= 0 and KEYS[3] then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', id_ttl) then dir = 0 end
end
if dir ~= 0 then
  for i = 1, nwin do
    local field = ARGV[4 + 2 * i]
    local c = tonumber(ARGV[5 + 2 * i])
    local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    local new
    if dir > 0 then
      local base = math.max(tat, now)
      new = math.min(base + c, math.max(base, now + cap))
    elseif tat <= now then
      new = tat
    else
      new = math.max(tat - c, now)
    end
    redis.call('HSET', KEYS[1], field, string.format('%.0f', new))
    if new - now > maxttl then maxttl = new - now end
  end
  if nwin > 0 then
    local ttl = math.ceil(maxttl / 1000) + 1000
    if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  end
end
if lease ~= '' then redis.call('ZREM', KEYS[2], lease) end
return 1
"#;

/// `op`, failed when it takes longer than `limit`. Every script call is bounded so (`--redis-timeout-ms`):
/// with Redis gone, the connection manager's reconnect and retry held a call for 1.5 s, long after the
/// filter had given up on it (its callout timeout), and a reserve that then ran when Redis was back took a
/// concurrency lease after the filter had sent its release (the slot stayed held for `lease_ms`).
async fn within<T>(
    limit: Duration,
    op: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(limit, op).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Redis did not answer within --redis-timeout-ms",
        ))),
    }
}

/// The connection: to one Redis (or a proxy in front of several), or to a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether `INFO cluster` says the server is a Redis Cluster node. A server that refuses `INFO` (a proxy,
/// a renamed command) is used as one Redis.
async fn is_cluster_node(c: &mut ConnectionManager) -> bool {
    redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(c)
        .await
        .is_ok_and(|info| info.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

pub struct RedisBackend {
    client: redis::Client,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
    reserve: Script,
    settle: Script,
}

fn keys(key: &str) -> (String, String) {
    (format!("mw:tl:{{{key}}}:w"), format!("mw:tl:{{{key}}}:c"))
}

impl RedisBackend {
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        // `rediss://`: TLS through rustls, whose process-wide crypto must be chosen before a connection
        // is made (an error only says another one was installed first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            client: redis::Client::open(url)?,
            timeout,
            conn: Mutex::new(None),
            reserve: Script::new(RESERVE_LUA),
            settle: Script::new(SETTLE_LUA),
        })
    }

    /// A connection manager (reconnects by itself); created lazily so the sidecar starts and answers
    /// (503 on rate-limit calls) while Redis is down.
    ///
    /// Bounded by the connection timeout, waiting for another call's attempt included: while Redis is
    /// down an attempt (with its retry) took 1.5 s, and every call queued behind it, one after the other
    /// (the 10th waited 15 s). Those calls were answered long after the filter had given up on them, and
    /// when Redis came back the queued reserves ran: they charged requests already answered and took
    /// concurrency leases after the filter had sent their release, holding those slots for `lease_ms`.
    ///
    /// A Redis Cluster node answers with a cluster connection instead (see the module documentation).
    async fn conn(&self) -> redis::RedisResult<Conn> {
        let connect_timeout = self.timeout.max(Duration::from_millis(100));
        let attempt = async {
            let mut guard = self.conn.lock().await;
            if let Some(c) = guard.as_ref() {
                return Ok(c.clone());
            }
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(self.timeout)
                .set_connection_timeout(connect_timeout)
                .set_number_of_retries(1)
                .set_max_delay(200);
            let mut single = self.client.get_connection_manager_with_config(cfg).await?;
            let c = if is_cluster_node(&mut single).await {
                let cluster = ClusterClientBuilder::new([self.client.get_connection_info().clone()])
                    .connection_timeout(connect_timeout)
                    .response_timeout(self.timeout)
                    .retries(2)
                    .build()?;
                Conn::Cluster(cluster.get_async_connection().await?)
            } else {
                Conn::Single(single)
            };
            *guard = Some(c.clone());
            Ok(c)
        };
        within(connect_timeout, attempt).await
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut c = self.conn().await?;
        within(self.timeout, redis::cmd("PING").query_async::<String>(&mut c)).await.map(|_| ())
    }

    async fn reserve_group(&self, c: &mut Conn, g: &Group) -> redis::RedisResult<GroupResult> {
        let (kw, kc) = keys(&g.key);
        let mut inv = self.reserve.key(kw);
        inv.key(kc);
        inv.arg(g.windows.len());
        match &g.concurrency {
            Some(cs) => inv.arg(cs.max).arg(&cs.lease_id).arg(cs.lease_ms.saturating_mul(1000)),
            None => inv.arg(0).arg("").arg(0),
        };
        for w in &g.windows {
            inv.arg(w.id()).arg(w.window_us()).arg(w.cost_us(g.cost));
        }
        let out: Vec<i64> = within(self.timeout, inv.invoke_async(c)).await?;
        let get = |i: usize| out.get(i).copied().unwrap_or(0);
        let at = |i: usize| u64::try_from(get(i)).unwrap_or(0);
        if get(1) == 2 {
            return Ok(GroupResult { allowed: false, reason: Some(DenyReason::Concurrency), ..Default::default() });
        }
        // The same answer as memory: the shared GCRA on the state the script read, at Redis's time.
        let now = at(2);
        let rs: Vec<_> = g.windows.iter().enumerate().map(|(i, w)| reserve(w, at(3 + i), now, g.cost)).collect();
        let allowed = get(0) == 1;
        if allowed != rs.iter().all(|r| r.allowed) {
            tracing::warn!(key = %g.key, "redis reserve script and the shared GCRA disagree");
        }
        Ok(GroupResult {
            allowed,
            reason: (!allowed).then_some(DenyReason::Tokens),
            windows: rs.iter().map(|r| r.state).collect(),
            never: rs.iter().any(|r| r.never),
        })
    }

    async fn settle_one(&self, c: &mut Conn, it: &SettleItem) -> redis::RedisResult<()> {
        let (kw, kc) = keys(&it.key);
        let mut inv = self.settle.key(kw);
        inv.key(kc);
        if let Some(id) = &it.id {
            // Same hash tag as the budget's keys: one slot in a Redis Cluster.
            inv.key(format!("mw:tl:{{{}}}:s:{id}", it.key));
        }
        inv.arg(it.delta.signum()).arg(it.windows.len()).arg(it.release_lease.as_deref().unwrap_or(""));
        inv.arg(it.id_ttl_ms()).arg(MAX_AHEAD_US);
        for w in &it.windows {
            inv.arg(w.id()).arg(w.cost_us(it.delta.unsigned_abs()));
        }
        let _: i64 = within(self.timeout, inv.invoke_async(c)).await?;
        Ok(())
    }

    /// `meshwarden_shared::ratelimit::reserve_all` over Redis (the trait is synchronous, Redis is not):
    /// every group is tried, a denial rolls back what was reserved and still stands if the rollback
    /// fails (an error would let `failure_mode: allow` admit an over-budget request), and an error rolls
    /// back what was reserved before it is returned, so the caller holds no slot and no budget.
    pub async fn reserve(&self, req: &ReserveRequest) -> redis::RedisResult<ReserveResponse> {
        let mut c = self.conn().await?;
        let mut results = Vec::with_capacity(req.groups.len());
        let mut denied_group = None;
        for (i, g) in req.groups.iter().enumerate() {
            match self.reserve_group(&mut c, g).await {
                Ok(r) => {
                    if !r.allowed {
                        denied_group.get_or_insert(i);
                    }
                    results.push(r);
                }
                Err(e) => {
                    self.roll_back(&mut c, req, &results).await;
                    return Err(e);
                }
            }
        }
        if denied_group.is_some() {
            self.roll_back(&mut c, req, &results).await;
        }
        Ok(ReserveResponse { allowed: denied_group.is_none(), denied_group, groups: results })
    }

    /// Refund every reserved group of `results`, each even when another fails (a failed one stays
    /// charged: more than used, never less; its lease expires after `lease_ms`).
    async fn roll_back(&self, c: &mut Conn, req: &ReserveRequest, results: &[GroupResult]) {
        for g in reserved(req, results) {
            if let Err(e) = self.settle_one(c, &rollback_item(g)).await {
                tracing::warn!(key = %g.key, error = %e, "redis rollback failed");
            }
        }
    }

    /// Apply every item, each even when another fails (one failed key must not leave the others'
    /// leases held); the first error is returned. The items are sent together, pipelined on the
    /// connection (in their order; each script is atomic on its own key): one call carries a tick's
    /// settlements of a gateway worker, up to 256, and one round trip each (a millisecond or two to a
    /// managed Redis) took longer than the filter waits for the call, which then dropped the batch.
    pub async fn settle(&self, items: &[SettleItem]) -> redis::RedisResult<()> {
        let c = self.conn().await?;
        let calls = items.iter().map(|it| {
            let mut c = c.clone();
            async move { self.settle_one(&mut c, it).await }
        });
        let results = futures_util::future::join_all(calls).await;
        results.into_iter().find_map(Result::err).map_or(Ok(()), Err)
    }
}

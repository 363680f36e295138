//! Which generation a new request goes to: the current one, or, while a canary runs, a share
//! of requests to the canary ([`Current`]).
//!
//! The split is decided on the request path, so it takes no lock and allocates nothing: a
//! request with the sticky key (a header or cookie) goes where a hash of the key's value
//! falls, and every other request takes a slot from the canary's counter of requests. Slots
//! spread the share evenly (with 10 %, every tenth slot is the canary's), so the share is met
//! over any stretch of traffic, not only on average. A new connection and an HTTP/2 stream
//! take one slot. An HTTP/1 connection that goes on takes them in blocks ([`Block`]), twice
//! as large each time up to [`MAX_BLOCK`], and serves each block's canary slots in one run:
//! moving a connection between the generations' runtimes costs about as much as a few
//! requests, so it moves about once per block, not once per request, and still every request
//! is counted where its slot says.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::plugin::generation::Generation;

/// The largest block of slots an HTTP/1 connection takes at once.
pub(crate) const MAX_BLOCK: u64 = 64;

/// A share of requests, in hundredths of a percent (0 to 10 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Share(u32);

impl Share {
    pub(crate) const TEN_PERCENT: Share = Share(1_000);

    /// `percent` (0 to 100, two decimals kept), or `None` outside that range.
    pub(crate) fn from_percent(percent: f64) -> Option<Share> {
        (0.0..=100.0).contains(&percent).then(|| Share((percent * 100.0).round() as u32))
    }

    pub(crate) fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }

    /// How many of the slots `n .. n + len` fall in the share: exactly `share` of any run of
    /// consecutive slots (to within one), spread evenly.
    fn slots_in(self, n: u64, len: u64) -> u64 {
        let below = |x: u64| (u128::from(x) * u128::from(self.0) / 10_000) as u64;
        below(n.saturating_add(len)) - below(n)
    }

    /// Whether a sticky key whose hash is `hash` falls in the share. Raising the share keeps
    /// every key that fell in it there.
    fn takes_key(self, hash: u64) -> bool {
        hash % 10_000 < u64::from(self.0)
    }
}

/// Where the sticky key of a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sticky {
    Header(http::HeaderName),
    Cookie(String),
}

impl std::str::FromStr for Sticky {
    type Err = String;

    fn from_str(text: &str) -> Result<Sticky, String> {
        let usage = "use header:NAME or cookie:NAME, like cookie:session or header:x-user-id";
        match text.split_once(':') {
            Some(("header", name)) => http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(Sticky::Header)
                .map_err(|_| format!("`{name}` is not a header name: {usage}")),
            Some(("cookie", name)) if !name.trim().is_empty() && !name.contains([';', '=', ' ']) => {
                Ok(Sticky::Cookie(name.trim().to_owned()))
            }
            Some(("cookie", name)) => Err(format!("`{name}` is not a cookie name: {usage}")),
            _ => Err(format!("`{text}`: {usage}")),
        }
    }
}

impl std::fmt::Display for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sticky::Header(name) => write!(f, "header:{name}"),
            Sticky::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

impl Sticky {
    /// The key's value in `headers`, if the request has one.
    fn key<'h>(&self, headers: &'h http::HeaderMap) -> Option<&'h [u8]> {
        match self {
            Sticky::Header(name) => headers.get(name).map(http::HeaderValue::as_bytes).filter(|v| !v.is_empty()),
            Sticky::Cookie(name) => headers.get_all(http::header::COOKIE).iter().find_map(|value| {
                value.as_bytes().split(|&b| b == b';').find_map(|pair| {
                    let pair = pair.trim_ascii_start();
                    let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
                    (!value.is_empty()).then_some(value)
                })
            }),
        }
    }
}

/// FNV-1a: a hash that stays the same across builds and hosts (std's `DefaultHasher`
/// promises neither), so a user stays on one version across host upgrades and a fleet.
/// Eight lines; a crate would add nothing.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A canary: a generation that gets a share of new requests while the current one serves the
/// rest.
pub(crate) struct Canary {
    generation: Arc<Generation>,
    share: AtomicU32,
    sticky: Option<Sticky>,
    /// Slots taken so far.
    slots: AtomicU64,
}

impl Canary {
    pub(crate) fn new(generation: Arc<Generation>, share: Share, sticky: Option<Sticky>) -> Canary {
        Canary { generation, share: AtomicU32::new(share.0), sticky, slots: AtomicU64::new(0) }
    }

    pub(crate) fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    pub(crate) fn share(&self) -> Share {
        Share(self.share.load(Ordering::Relaxed))
    }

    pub(crate) fn set_share(&self, share: Share) {
        self.share.store(share.0, Ordering::Relaxed);
    }

    pub(crate) fn sticky(&self) -> Option<&Sticky> {
        self.sticky.as_ref()
    }
}

/// Slots an HTTP/1 connection took at once: `canary_slots` of its next `len` requests are the
/// canary's.
pub(crate) struct Block {
    pub(crate) canary: Arc<Generation>,
    pub(crate) canary_slots: u64,
    pub(crate) len: u64,
}

/// The generation new requests go to, and the canary, if one runs: written by the registry,
/// read by the server for every new connection and request.
pub(crate) struct Current {
    serving: ArcSwap<Generation>,
    canary: ArcSwapOption<Canary>,
    /// Whether `canary` is set: what the request path reads first.
    split: AtomicBool,
}

impl Current {
    pub(crate) fn new(first: Arc<Generation>) -> Current {
        Current { serving: ArcSwap::new(first), canary: ArcSwapOption::empty(), split: AtomicBool::new(false) }
    }

    /// The current generation: what serves every request the canary does not get.
    pub(crate) fn load(&self) -> Arc<Generation> {
        self.serving.load_full()
    }

    /// Whether generation `id` is the current one (no reference count taken).
    pub(crate) fn is_current(&self, id: u64) -> bool {
        self.serving.load().id() == id
    }

    /// Makes `next` current; returns the one it replaces.
    pub(crate) fn swap(&self, next: Arc<Generation>) -> Arc<Generation> {
        self.serving.swap(next)
    }

    /// The canary, if one runs.
    pub(crate) fn canary(&self) -> Option<Arc<Canary>> {
        self.canary.load_full()
    }

    /// Whether a canary runs: one atomic load.
    pub(crate) fn is_split(&self) -> bool {
        self.split.load(Ordering::Acquire)
    }

    /// Starts (or replaces, or with `None` ends) the canary; returns the one it replaces.
    pub(crate) fn set_canary(&self, canary: Option<Arc<Canary>>) -> Option<Arc<Canary>> {
        let split = canary.is_some();
        let old = self.canary.swap(canary);
        self.split.store(split, Ordering::Release);
        old
    }

    /// Sends no more requests to the canary if it is still `generation`'s; whether it was.
    /// For a rollback decided while the registry's changes are held: the rest of the
    /// rollback waits for them, its traffic does not. (`split` stays as it is: a request that
    /// finds no canary goes to the current generation, and the rollback clears it.)
    pub(crate) fn stop_canary(&self, generation: &Arc<Generation>) -> bool {
        let canary = self.canary.load();
        if !canary.as_ref().is_some_and(|c| Arc::ptr_eq(&c.generation, generation)) {
            return false;
        }
        let before = self.canary.compare_and_swap(&*canary, None);
        before.as_ref().map(Arc::as_ptr) == canary.as_ref().map(Arc::as_ptr)
    }

    /// Where the next request goes (it takes one slot): the canary's generation for its
    /// share of slots, else the current one.
    pub(crate) fn route(&self) -> Arc<Generation> {
        match self.take_block(1) {
            Some(block) if block.canary_slots == 1 => block.canary,
            _ => self.load(),
        }
    }

    /// Takes `len` slots, while a canary runs: how many of them are the canary's.
    pub(crate) fn take_block(&self, len: u64) -> Option<Block> {
        if !self.is_split() {
            return None;
        }
        let canary = self.canary.load();
        let canary = canary.as_ref()?;
        let n = canary.slots.fetch_add(len, Ordering::Relaxed);
        Some(Block { canary: canary.generation.clone(), canary_slots: canary.share().slots_in(n, len), len })
    }

    /// Where a request with these headers must go because of its sticky key, if a canary
    /// runs, routes by a key, and the request has one.
    pub(crate) fn route_sticky(&self, headers: &http::HeaderMap) -> Option<Arc<Generation>> {
        if !self.is_split() {
            return None;
        }
        let canary = self.canary.load();
        let canary = canary.as_ref()?;
        let key = canary.sticky.as_ref()?.key(headers)?;
        Some(if canary.share().takes_key(stable_hash(key)) { canary.generation.clone() } else { self.load() })
    }

    /// The current generation or the canary's, by id (`None` if it is neither any more).
    pub(crate) fn by_id(&self, id: u64) -> Option<Arc<Generation>> {
        let current = self.load();
        if current.id() == id {
            return Some(current);
        }
        self.canary().map(|c| c.generation.clone()).filter(|g| g.id() == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_meet_the_share_over_any_stretch() {
        for percent in [0.0, 0.5, 10.0, 33.3, 50.0, 99.0, 100.0] {
            let share = Share::from_percent(percent).unwrap();
            for start in [0u64, 7, 9_995, 123_456] {
                let one_by_one = (start..start + 2000).map(|n| share.slots_in(n, 1)).sum::<u64>() as f64;
                let expected = 2000.0 * percent / 100.0;
                assert!((one_by_one - expected).abs() <= 1.0, "{percent}% from {start}: {one_by_one} of 2000");
                // Taken in blocks, the same slots.
                let mut blocks = 0;
                let mut n = start;
                for len in [1, 2, 4, 8, 16, 32, 64, 64, 64, 64] {
                    blocks += share.slots_in(n, len);
                    n += len;
                }
                assert_eq!(blocks, (start..n).map(|n| share.slots_in(n, 1)).sum::<u64>());
                assert!(share.slots_in(u64::MAX - 10, 64) <= 64);
            }
        }
    }

    #[test]
    fn a_share_is_a_percentage() {
        assert_eq!(Share::from_percent(12.345), Some(Share(1235)));
        assert_eq!(Share::from_percent(100.0), Some(Share(10_000)));
        assert_eq!(Share::from_percent(100.5), None);
        assert_eq!(Share::from_percent(-1.0), None);
    }

    #[test]
    fn a_sticky_key_is_found_in_its_header_or_cookie() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        headers.append(http::header::COOKIE, "theme=dark; session=s1".parse().unwrap());
        headers.append(http::header::COOKIE, "sessionx=no".parse().unwrap());
        let header: Sticky = "header:X-User".parse().unwrap();
        assert_eq!(header.key(&headers), Some(&b"alice"[..]));
        let cookie: Sticky = "cookie:session".parse().unwrap();
        assert_eq!(cookie.key(&headers), Some(&b"s1"[..]));
        let missing: Sticky = "cookie:sess".parse().unwrap();
        assert_eq!(missing.key(&headers), None);
        assert!("cookie:".parse::<Sticky>().is_err());
        assert!("query:user".parse::<Sticky>().is_err());
        assert_eq!(cookie.to_string(), "cookie:session");
    }

    #[test]
    fn sticky_keys_spread_like_the_share_and_stay_as_it_grows() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let ten = Share::from_percent(10.0).unwrap();
        let twenty = Share::from_percent(20.0).unwrap();
        let in_ten: Vec<&String> = keys.iter().filter(|k| ten.takes_key(stable_hash(k.as_bytes()))).collect();
        assert!((900..=1100).contains(&in_ten.len()), "{} of 10000 keys at 10%", in_ten.len());
        assert!(in_ten.iter().all(|k| twenty.takes_key(stable_hash(k.as_bytes()))));
    }
}

//! Forwards the plugin's `tracing` events, and records of the `log` crate, to the host's log.
//!
//! A cdylib has its own copy of `tracing`'s and `log`'s globals, so what a plugin emits would
//! go nowhere. Before the author's init the plugin installs [`HostSubscriber`] as its global
//! default, and after it [`LogBridge`] as its logger, unless the author installed one; the
//! host records each event tagged with the plugin's name and version.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, LevelFilter, Metadata, Subscriber};

use crate::abi::{FfiStr, HostApi};

pub(crate) fn level_number(level: &Level) -> u32 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

fn level_filter(n: u32) -> LevelFilter {
    match n {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// Sends one message to the host's log.
pub(crate) fn emit(host: &HostApi, level: u32, target: &str, message: &str) {
    // SAFETY: the strings outlive the call; the host copies what it keeps.
    unsafe { (host.log)(host.context, level, FfiStr::new(target.as_bytes()), FfiStr::new(message.as_bytes())) };
}

/// Sends one message, from within `spans` (`outer{a=1}:inner`, or empty), to the host's log.
fn emit_in(host: &HostApi, level: u32, target: &str, spans: &str, message: &str) {
    match host.log_in_spans_fn() {
        // SAFETY: the strings outlive the call; the host copies what it keeps.
        Some(log) => unsafe {
            log(host.context, level, FfiStr::new(target.as_bytes()), FfiStr::new(spans.as_bytes()), FfiStr::new(message.as_bytes()))
        },
        // A host from before `log_in_spans`: the context leads the message, as `fmt` puts it.
        None if !spans.is_empty() => emit(host, level, target, &format!("{spans}: {message}")),
        None => emit(host, level, target, message),
    }
}

pub(crate) struct HostSubscriber {
    host: &'static HostApi,
    max: LevelFilter,
    /// The open spans, by id: what an event inside them shows as its context.
    spans: Mutex<HashMap<u64, Span>>,
    next_id: AtomicU64,
}

/// A span of the plugin's, open.
struct Span {
    metadata: &'static Metadata<'static>,
    name: &'static str,
    /// Its fields, as `a=1 b=2`.
    fields: String,
    /// Handles to it (`clone_span` adds one, `try_close` takes one away).
    refs: usize,
}

thread_local! {
    /// The spans entered on this thread, innermost last. (Generation threads are joined before
    /// the library unloads, so this destructor always runs in time.)
    static ENTERED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

impl HostSubscriber {
    pub(crate) fn new(host: &'static HostApi) -> HostSubscriber {
        HostSubscriber { host, max: level_filter(host.max_log_level), spans: Mutex::default(), next_id: AtomicU64::new(1) }
    }

    fn spans(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Span>> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The spans entered on this thread, as `outer{a=1}:inner{b=2}` (as tracing-subscriber's
    /// `fmt` shows them); empty outside any.
    fn context(&self) -> String {
        let entered = ENTERED.try_with(|entered| entered.borrow().clone()).unwrap_or_default();
        if entered.is_empty() {
            return String::new();
        }
        let spans = self.spans();
        if entered.iter().any(|id| !spans.contains_key(id)) {
            // Closed spans left on this thread's stack (entered here, exited on another thread:
            // a guard held across an await): forget them, or the stack grows for good.
            let _ = ENTERED.try_with(|stack| stack.borrow_mut().retain(|id| spans.contains_key(id)));
        }
        let mut context = String::new();
        let mut shown: Vec<u64> = Vec::with_capacity(entered.len());
        for (id, span) in entered.iter().filter_map(|id| Some((*id, spans.get(id)?))) {
            // A span entered again inside itself shows once, as `fmt` shows it.
            if shown.contains(&id) {
                continue;
            }
            shown.push(id);
            if !context.is_empty() {
                context.push(':');
            }
            context.push_str(span.name);
            if !span.fields.is_empty() {
                let _ = write!(context, "{{{}}}", span.fields);
            }
        }
        context
    }
}

impl Subscriber for HostSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        let mut fields = Fields::default();
        attributes.record(&mut fields);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let metadata = attributes.metadata();
        let span = Span { metadata, name: metadata.name(), fields: fields.finish(), refs: 1 };
        self.spans().insert(id, span);
        Id::from_u64(id)
    }

    fn record(&self, id: &Id, values: &Record<'_>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        let added = fields.finish();
        if let Some(span) = self.spans().get_mut(&id.into_u64()) {
            if !span.fields.is_empty() && !added.is_empty() {
                span.fields.push(' ');
            }
            span.fields.push_str(&added);
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn enter(&self, id: &Id) {
        let _ = ENTERED.try_with(|entered| entered.borrow_mut().push(id.into_u64()));
    }

    fn exit(&self, id: &Id) {
        let _ = ENTERED.try_with(|entered| {
            let mut entered = entered.borrow_mut();
            if let Some(at) = entered.iter().rposition(|entered| *entered == id.into_u64()) {
                entered.remove(at);
            }
        });
    }

    /// The innermost span entered on this thread: what `Span::current()` and
    /// `in_current_span()` find.
    fn current_span(&self) -> tracing_core::span::Current {
        let entered = ENTERED.try_with(|entered| entered.borrow().clone()).unwrap_or_default();
        let spans = self.spans();
        match entered.iter().rev().find_map(|id| Some((*id, spans.get(id)?.metadata))) {
            Some((id, metadata)) => tracing_core::span::Current::new(Id::from_u64(id), metadata),
            None => tracing_core::span::Current::none(),
        }
    }

    fn clone_span(&self, id: &Id) -> Id {
        if let Some(span) = self.spans().get_mut(&id.into_u64()) {
            span.refs += 1;
        }
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let mut spans = self.spans();
        let Some(span) = spans.get_mut(&id.into_u64()) else { return false };
        span.refs -= 1;
        let closed = span.refs == 0;
        if closed {
            spans.remove(&id.into_u64());
        }
        closed
    }

    fn event(&self, event: &Event<'_>) {
        let mut text = Fields::default();
        event.record(&mut text);
        let meta = event.metadata();
        emit_in(self.host, level_number(meta.level()), meta.target(), &self.context(), &text.finish());
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Fields {
    fn finish(mut self) -> String {
        if !self.rest.is_empty() {
            if !self.message.is_empty() {
                self.message.push(' ');
            }
            self.message.push_str(self.rest.trim_start());
        }
        self.message
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            // Quoted, as tracing's own formatter has them: a value may hold spaces or `=`.
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// Forwards records of the `log` crate (many libraries log through it rather than `tracing`)
/// like events, at the host's level.
pub(crate) struct LogBridge;

impl LogBridge {
    /// Installs the bridge as the plugin's logger (unless its author installed one), at the
    /// host's level.
    pub(crate) fn install(host: &HostApi) {
        static BRIDGE: LogBridge = LogBridge;
        if ::log::set_logger(&BRIDGE).is_ok() {
            // `log` numbers its levels as the host does: Off = 0, Error = 1 … Trace = 5.
            let max = ::log::LevelFilter::iter().nth(host.max_log_level as usize).unwrap_or(::log::LevelFilter::Trace);
            ::log::set_max_level(max);
        }
    }
}

impl ::log::Log for LogBridge {
    fn enabled(&self, metadata: &::log::Metadata<'_>) -> bool {
        crate::try_host().is_some_and(|host| metadata.level() as u32 <= host.max_log_level)
    }

    fn log(&self, record: &::log::Record<'_>) {
        let Some(host) = crate::try_host() else { return };
        let level = record.level() as u32;
        if level <= host.max_log_level {
            emit(host, level, record.target(), &record.args().to_string());
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::level_number;

    #[test]
    fn the_log_crate_numbers_levels_as_the_host_does() {
        use tracing_core::Level;
        let pairs = [
            (::log::Level::Error, Level::ERROR),
            (::log::Level::Warn, Level::WARN),
            (::log::Level::Info, Level::INFO),
            (::log::Level::Debug, Level::DEBUG),
            (::log::Level::Trace, Level::TRACE),
        ];
        for (log, tracing) in pairs {
            assert_eq!(log as u32, level_number(&tracing), "{log}");
            assert_eq!(::log::LevelFilter::iter().nth(log as usize), Some(log.to_level_filter()));
        }
        assert_eq!(::log::LevelFilter::iter().next(), Some(::log::LevelFilter::Off));
    }
}

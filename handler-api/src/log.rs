//! Forwards the plugin's `tracing` events to the host's subscriber.
//!
//! A cdylib has its own copy of `tracing`'s globals, so events a plugin emits would go
//! nowhere. At init the plugin installs [`HostSubscriber`] as its global default; the host
//! records each event tagged with the plugin's name and version.

use std::fmt::{self, Write as _};

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

pub(crate) struct HostSubscriber {
    host: &'static HostApi,
    max: LevelFilter,
}

impl HostSubscriber {
    pub(crate) fn new(host: &'static HostApi) -> HostSubscriber {
        HostSubscriber { host, max: level_filter(host.max_log_level) }
    }
}

impl Subscriber for HostSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    // Spans are not forwarded (yet): events carry their own fields.
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = Fields::default();
        event.record(&mut text);
        let meta = event.metadata();
        emit(self.host, level_number(meta.level()), meta.target(), &text.finish());
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
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }
}

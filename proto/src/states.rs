//! The one mapping between the state enums of `quiesce.coordinator.v1` (and the agent's
//! `FreezeEnd`) and their text: what the catalog stores, `--json` prints and metrics label.
//!
//! The text of a value is its proto name without the enum's prefix, in lower case, with `_`
//! as `-`; `UNSPECIFIED` is the empty string. The catalog keeps the TEXT columns it always had,
//! so older catalogs read unchanged; text that names no value is an [`UnknownState`].

use crate::agent::v1::FreezeEnd;
use crate::coordinator::v1::{Completion, HostState, SetPhase, SetState};

/// Text that names no value of a state enum (read from a catalog, or a reply).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {text:?}")]
pub struct UnknownState {
    /// Which enum, e.g. "set state".
    pub kind: &'static str,
    pub text: String,
}

/// A state enum with a text form.
pub trait StateText: Sized + Copy + Default + TryFrom<i32> + 'static {
    /// Which enum, in words ("set state").
    const KIND: &'static str;
    /// Every value, `Unspecified` first.
    const ALL: &'static [Self];
    fn text(self) -> &'static str;
    fn from_text(text: &str) -> Result<Self, UnknownState>;
    /// The text of a raw proto field (`Unspecified`'s for a number the enum does not know).
    fn text_of(value: i32) -> &'static str {
        Self::try_from(value).unwrap_or_default().text()
    }
}

macro_rules! state_text {
    ($ty:ident, $kind:literal, empty_ok: $empty_ok:literal, { $($variant:ident => $text:literal),* $(,)? }
     $(, also: { $($alias:literal => $avariant:ident),* })?) => {
        impl StateText for $ty {
            const KIND: &'static str = $kind;
            const ALL: &'static [Self] = &[$ty::Unspecified, $($ty::$variant),*];
            fn text(self) -> &'static str {
                match self {
                    $ty::Unspecified => "",
                    $($ty::$variant => $text,)*
                }
            }
            fn from_text(text: &str) -> Result<Self, UnknownState> {
                match text {
                    "" if $empty_ok => Ok($ty::Unspecified),
                    $($text => Ok($ty::$variant),)*
                    $($($alias => Ok($ty::$avariant),)*)?
                    _ => Err(UnknownState { kind: $kind, text: text.to_owned() }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.text())
            }
        }
    };
}

state_text!(SetState, "set state", empty_ok: false, {
    Running => "running",
    Consistent => "consistent",
    Failed => "failed",
});

state_text!(SetPhase, "set phase", empty_ok: false, {
    Planned => "planned",
    Preparing => "preparing",
    Freezing => "freezing",
    Snapshotting => "snapshotting",
    Thawing => "thawing",
    Committed => "committed",
    Aborting => "aborting",
    Aborted => "aborted",
});

state_text!(HostState, "host state", empty_ok: false, {
    Pending => "pending",
    Prepared => "prepared",
    Frozen => "frozen",
    Thawed => "thawed",
    Failed => "failed",
});

state_text!(Completion, "completion", empty_ok: true, {
    Pending => "pending",
    Completed => "completed",
    Error => "error",
});

// Catalogs written before the enums stored "unspecified" for an agent that named no end.
state_text!(FreezeEnd, "freeze end", empty_ok: true, {
    Thawed => "thawed",
    LeaseExpired => "lease-expired",
    MaxFreeze => "max-freeze",
    Shutdown => "shutdown",
    ExternalThaw => "external-thaw",
    UnknownSet => "unknown-set",
    Guardian => "guardian",
}, also: { "unspecified" => Unspecified });

impl SetPhase {
    /// The `phase` label of `quiesce_phase_duration_seconds` for the time spent in this phase
    /// (the phase that starts when the set is planned is timed as `planning`).
    pub fn duration_label(self) -> &'static str {
        match self {
            SetPhase::Planned => "planning",
            other => other.text(),
        }
    }
}

/// `serialize_with` functions for the state fields: `--json` prints them as their text.
pub mod json {
    use super::*;

    macro_rules! as_text {
        ($name:ident, $ty:ty) => {
            pub fn $name<S: serde::Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(<$ty>::text_of(*value))
            }
        };
    }

    as_text!(set_state, SetState);
    as_text!(set_phase, SetPhase);
    as_text!(host_state, HostState);
    as_text!(completion, Completion);
    as_text!(freeze_end, FreezeEnd);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule the proto comment states (and scripts/json-schemas applies), for every value.
    fn follows_rule<E: StateText>(name: fn(E) -> &'static str, prefix: &str) {
        for &value in E::ALL {
            let expected = name(value)
                .strip_prefix(prefix)
                .unwrap()
                .to_lowercase()
                .replace('_', "-");
            let expected = if expected == "unspecified" {
                String::new()
            } else {
                expected
            };
            assert_eq!(value.text(), expected, "{}", E::KIND);
            if !value.text().is_empty() {
                assert_eq!(E::from_text(value.text()).unwrap().text(), value.text());
            }
        }
    }

    #[test]
    fn every_text_is_the_proto_name_in_lower_case() {
        follows_rule::<SetState>(|v| v.as_str_name(), "SET_STATE_");
        follows_rule::<SetPhase>(|v| v.as_str_name(), "SET_PHASE_");
        follows_rule::<HostState>(|v| v.as_str_name(), "HOST_STATE_");
        follows_rule::<Completion>(|v| v.as_str_name(), "COMPLETION_");
        follows_rule::<FreezeEnd>(|v| v.as_str_name(), "FREEZE_END_");
    }

    #[test]
    fn every_value_is_listed() {
        assert_eq!(SetState::ALL.len(), 4);
        assert_eq!(SetPhase::ALL.len(), 9);
        assert_eq!(HostState::ALL.len(), 6);
        assert_eq!(Completion::ALL.len(), 4);
        assert_eq!(FreezeEnd::ALL.len(), 8);
        for (i, v) in SetPhase::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
    }

    #[test]
    fn unknown_text_is_an_error_naming_it() {
        let e = SetState::from_text("snapshotted").unwrap_err();
        assert_eq!(e.to_string(), "unknown set state \"snapshotted\"");
        assert!(SetState::from_text("").is_err());
        assert_eq!(Completion::from_text("").unwrap(), Completion::Unspecified);
        assert_eq!(
            FreezeEnd::from_text("unspecified").unwrap(),
            FreezeEnd::Unspecified
        );
    }

    #[test]
    fn json_prints_the_text() {
        let set = crate::coordinator::v1::SnapshotSet {
            state: SetState::Consistent as i32,
            phase: SetPhase::Committed as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(&set).unwrap();
        assert_eq!(json["state"], "consistent");
        assert_eq!(json["phase"], "committed");
        assert_eq!(json["completion"], "");
    }
}

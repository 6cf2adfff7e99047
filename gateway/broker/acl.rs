//! Which topics a device may publish to and subscribe to, and which filters MQTT allows
//! at all. Pure string rules.
//!
//! A device `ID` may publish only under `devices/ID/` and subscribe only to
//! `devices/ID/commands[/...]` and to the read-only `branch/...` tree.

/// May `device` publish to `topic`?
pub fn may_publish(device: &str, topic: &str) -> bool {
    let Some(rest) = topic
        .strip_prefix("devices/")
        .and_then(|r| r.strip_prefix(device))
        .and_then(|r| r.strip_prefix('/'))
    else {
        return false;
    };
    !rest.is_empty() && !rest.contains(['+', '#'])
}

/// May `device` subscribe to `filter`?
pub fn may_subscribe(device: &str, filter: &str) -> bool {
    if filter == "branch" || filter.starts_with("branch/") {
        return true;
    }
    match filter
        .strip_prefix("devices/")
        .and_then(|r| r.strip_prefix(device))
        .and_then(|r| r.strip_prefix("/commands"))
    {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Does `filter` (valid, see [`valid_filter`]) match `topic` (MQTT 5 §4.7)?
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(level)) if f == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Is `filter` a valid MQTT topic filter (3.1.1 §4.7, 5 §4.7)? Not empty, no NUL, `#`
/// only as the whole last level, `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && !(last && level == "#") {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_topics() {
        let t = "devices/k1/commands/notice";
        for yes in [
            "devices/k1/commands/#",
            "devices/k1/commands/+",
            t,
            "devices/+/commands/#",
            "#",
        ] {
            assert!(matches(yes, t), "{yes}");
        }
        for no in [
            "devices/k1/commands",
            "devices/k1/commands/x",
            "devices/k1/+",
            "devices/k2/#",
            "devices/k1/commands/notice/x",
        ] {
            assert!(!matches(no, t), "{no}");
        }
        assert!(matches("devices/k1/commands/#", "devices/k1/commands"));
    }

    #[test]
    fn filter_syntax() {
        for ok in [
            "a", "a/b", "#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "branch/#",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "branch/a#",
            "a/#/b",
            "a#",
            "a+",
            "a/b+/c",
            "##",
            "a/\0",
            "#/a",
        ] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn publish_rules() {
        assert!(may_publish("k1", "devices/k1/telemetry"));
        assert!(may_publish("k1", "devices/k1/events"));
        assert!(may_publish("k1", "devices/k1/whatever"));
        assert!(!may_publish("k1", "devices/k1/"));
        assert!(!may_publish("k1", "devices/k1"));
        assert!(!may_publish("k1", "devices/k10/events"));
        assert!(!may_publish("k10", "devices/k1/events"));
        assert!(!may_publish("k1", "devices/k2/events"));
        assert!(!may_publish("k1", "branch/summary/live"));
        assert!(!may_publish("k1", "devices/k1/a/#"));
    }

    #[test]
    fn subscribe_rules() {
        assert!(may_subscribe("k1", "devices/k1/commands/#"));
        assert!(may_subscribe("k1", "devices/k1/commands"));
        assert!(may_subscribe("k1", "devices/k1/commands/reboot"));
        assert!(may_subscribe("k1", "branch/#"));
        assert!(may_subscribe("k1", "branch/summary/live"));
        assert!(!may_subscribe("k1", "#"));
        assert!(!may_subscribe("k1", "devices/#"));
        assert!(!may_subscribe("k1", "devices/+/commands/#"));
        assert!(!may_subscribe("k1", "devices/k1/#"));
        assert!(!may_subscribe("k1", "devices/k1/commandsX"));
        assert!(!may_subscribe("k1", "devices/k2/commands/#"));
        assert!(!may_subscribe("k1", "branchX/#"));
        assert!(!may_subscribe("k1", "$share/g/branch/#"));
    }
}

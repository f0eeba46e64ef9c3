//! Availability traces (`--availability FILE`): which participants are online in which
//! rounds, as cross-device studies replay devices' real availability. A CSV file with the
//! header `participant,from_round,to_round` and one line per interval (inclusive; several
//! lines for a participant that comes and goes): a participant listed is online only in its
//! intervals, one not listed is always online. The virtual engine takes participants that
//! are offline in a round out of the federation before the round starts (they are not
//! selected and do not evaluate) and brings them back when their next interval begins.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, bail};

/// Each listed participant's online intervals, in rounds.
#[derive(Debug, Clone, Default)]
pub(super) struct Availability {
    intervals: BTreeMap<String, Vec<(u64, u64)>>,
}

impl Availability {
    /// Reads a trace, checking that it names only `participants`.
    pub(super) fn load(path: &Path, participants: &BTreeSet<String>) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the availability trace {}", path.display()))?;
        Self::parse(&text, participants)
            .with_context(|| format!("availability trace {}", path.display()))
    }

    pub(super) fn parse(text: &str, participants: &BTreeSet<String>) -> anyhow::Result<Self> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        match lines.next() {
            Some((_, h)) if h.trim() == "participant,from_round,to_round" => {}
            _ => bail!("line 1: the header must be `participant,from_round,to_round`"),
        }
        let mut intervals: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for (i, line) in lines {
            let at = i + 1;
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [id, from, to] = fields[..] else {
                bail!("line {at}: {} fields where 3 belong", fields.len());
            };
            if !participants.contains(id) {
                bail!("line {at}: no participant {id:?} in this simulation");
            }
            let round = |s: &str, what: &str| -> anyhow::Result<u64> {
                match s.parse::<u64>() {
                    Ok(r) if r >= 1 => Ok(r),
                    _ => bail!("line {at}: {what} {s:?} is not a round number (1 or more)"),
                }
            };
            let (from, to) = (round(from, "from_round")?, round(to, "to_round")?);
            if to < from {
                bail!("line {at}: to_round {to} is before from_round {from}");
            }
            intervals
                .entry(id.to_string())
                .or_default()
                .push((from, to));
        }
        Ok(Availability { intervals })
    }

    /// Whether `id` is online in `round`.
    pub(super) fn online(&self, id: &str, round: u64) -> bool {
        self.intervals
            .get(id)
            .is_none_or(|iv| iv.iter().any(|&(a, b)| (a..=b).contains(&round)))
    }

    /// The participants whose availability changes from `round − 1` to `round`: those who
    /// go offline, and those who come back.
    pub(super) fn changes(&self, round: u64) -> (Vec<&str>, Vec<&str>) {
        let (mut gone, mut back) = (Vec::new(), Vec::new());
        for id in self.intervals.keys() {
            match (self.online(id, round - 1), self.online(id, round)) {
                (true, false) => gone.push(id.as_str()),
                (false, true) => back.push(id.as_str()),
                _ => {}
            }
        }
        (gone, back)
    }

    /// The listed participants offline in `round`.
    pub(super) fn offline(&self, round: u64) -> Vec<&str> {
        self.intervals
            .keys()
            .filter(|id| !self.online(id, round))
            .map(String::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> BTreeSet<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn intervals_say_who_is_online_and_who_comes_and_goes() {
        let t = "participant,from_round,to_round\na,1,2\na,5,5\nb,3,10\n";
        let av = Availability::parse(t, &ids()).unwrap();
        let online = |id, r| av.online(id, r);
        assert!(online("a", 1) && online("a", 2) && !online("a", 3) && online("a", 5));
        assert!(!online("b", 2) && online("b", 3));
        assert!(
            online("c", 1) && online("c", 99),
            "not listed: always online"
        );
        assert_eq!(av.offline(1), vec!["b"]);
        assert_eq!(av.changes(3), (vec!["a"], vec!["b"]));
        assert_eq!(av.changes(5), (vec![], vec!["a"]));
        assert_eq!(av.changes(6), (vec!["a"], vec![]));
    }

    #[test]
    fn bad_traces_name_the_line() {
        for (t, want) in [
            ("who,when\n", "line 1: the header"),
            ("participant,from_round,to_round\na,1\n", "line 2: 2 fields"),
            (
                "participant,from_round,to_round\nz,1,2\n",
                "line 2: no participant \"z\"",
            ),
            (
                "participant,from_round,to_round\na,0,2\n",
                "line 2: from_round \"0\"",
            ),
            (
                "participant,from_round,to_round\na,1,2\nb,4,3\n",
                "line 3: to_round 3 is before",
            ),
        ] {
            let e = Availability::parse(t, &ids()).unwrap_err().to_string();
            assert!(e.contains(want), "{t:?}: {e}");
        }
    }
}

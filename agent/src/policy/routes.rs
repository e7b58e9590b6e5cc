//! A destination's path patterns compiled into a segment trie.
//!
//! Each node has literal children (sorted, binary-searched), `{name:REGEX}` children (one
//! per distinct regex, in order of first appearance), at most one `{param}` child, the
//! rules whose pattern ends at the node, and the rules whose pattern ends with `**` there.
//!
//! Matching explores, at each segment, the literal child, then every constrained child
//! whose regex matches, in order, then the plain parameter child, and reports EVERY rule
//! on EVERY matching branch: the precedence is only the order of exploration. Which rule
//! decides is chosen by the caller among all matches (the first allowing rule in file
//! order), so a literal route never hides a parameter route or the other way round.
//! Every trie node is visited at most once, so the cost is bounded by the path length and
//! the trie (plus one regex match per constrained child tried), not by the number of
//! rules. Matching allocates nothing.

use super::matchers::Pattern;
use super::model::{PathPattern, PatternSegment};

/// Index of a rule in its destination's rule list.
pub(crate) type RuleIndex = usize;

/// The compiled path patterns of one destination.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// Literal children, sorted by segment.
    literals: Vec<(Box<str>, Node)>,
    /// `{name:REGEX}` children, one per distinct regex, in order of first appearance.
    constrained: Vec<(Pattern, Node)>,
    /// The `{param}` child; parameter names do not matter for matching.
    param: Option<Box<Node>>,
    /// Rules whose pattern ends exactly here, ascending.
    exact: Vec<RuleIndex>,
    /// Rules whose pattern ends here with a trailing `/` (`/a/`), ascending.
    exact_slash: Vec<RuleIndex>,
    /// Rules whose pattern ends with `**` here, ascending.
    tail: Vec<RuleIndex>,
}

impl RouteTable {
    /// Compiles the patterns; the n-th pattern belongs to rule n.
    pub fn build<'a>(patterns: impl IntoIterator<Item = &'a PathPattern>) -> Self {
        let mut table = RouteTable::default();
        for (rule, pattern) in patterns.into_iter().enumerate() {
            table.insert(pattern, rule);
        }
        table
    }

    fn insert(&mut self, pattern: &PathPattern, rule: RuleIndex) {
        let mut node = &mut self.root;
        for segment in pattern.segments() {
            node = match segment {
                PatternSegment::Literal(lit) => {
                    let at = match node
                        .literals
                        .binary_search_by(|(k, _)| (**k).cmp(lit.as_str()))
                    {
                        Ok(at) => at,
                        Err(at) => {
                            node.literals
                                .insert(at, (lit.as_str().into(), Node::default()));
                            at
                        }
                    };
                    &mut node.literals[at].1
                }
                PatternSegment::Constrained { pattern, .. } => {
                    let at = match node.constrained.iter().position(|(p, _)| p == pattern) {
                        Some(at) => at,
                        None => {
                            node.constrained.push((pattern.clone(), Node::default()));
                            node.constrained.len() - 1
                        }
                    };
                    &mut node.constrained[at].1
                }
                PatternSegment::Param(_) => node.param.get_or_insert_with(Box::default),
                PatternSegment::Tail => {
                    node.tail.push(rule);
                    return;
                }
            };
        }
        if pattern.has_trailing_slash() {
            node.exact_slash.push(rule);
        } else {
            node.exact.push(rule);
        }
    }

    /// Calls `each` with every rule whose pattern matches `path`, a canonical path
    /// (see [`CanonicalPath::path`](super::CanonicalPath::path)). Rules may come in any
    /// order.
    ///
    /// A trailing `/` is part of the path: `/a` matches only `/a`, `/a/` only `/a/`, and
    /// `/a/**` matches `/a`, `/a/` and everything below. The root `/` matches `/`.
    pub fn for_each_match(&self, path: &str, each: &mut impl FnMut(RuleIndex)) {
        match path {
            "/" | "" => self.root.walk("", each),
            _ => self.root.walk(path, each),
        }
    }
}

impl Node {
    /// `rest` is the part of the path below this node: empty (the path ends here), `/`
    /// (it ends here with a trailing slash), or `/segment…`.
    fn walk(&self, rest: &str, each: &mut impl FnMut(RuleIndex)) {
        for &rule in &self.tail {
            each(rule);
        }
        let below = match rest {
            "" => {
                for &rule in &self.exact {
                    each(rule);
                }
                return;
            }
            "/" => {
                for &rule in &self.exact_slash {
                    each(rule);
                }
                return;
            }
            _ => rest.strip_prefix('/').unwrap_or(rest),
        };
        let (segment, next) = match below.find('/') {
            Some(at) => (&below[..at], &below[at..]),
            None => (below, ""),
        };
        if let Ok(at) = self.literals.binary_search_by(|(k, _)| (**k).cmp(segment)) {
            self.literals[at].1.walk(next, each);
        }
        for (pattern, child) in &self.constrained {
            if pattern.is_match(segment) {
                child.walk(next, each);
            }
        }
        if let Some(param) = &self.param {
            param.walk(next, each);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> RouteTable {
        let patterns: Vec<PathPattern> = patterns
            .iter()
            .map(|p| PathPattern::try_from((*p).to_owned()).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        RouteTable::build(&patterns)
    }

    fn matches(t: &RouteTable, path: &str) -> Vec<RuleIndex> {
        let mut out = Vec::new();
        t.for_each_match(path, &mut |r| out.push(r));
        out.sort_unstable();
        out
    }

    #[test]
    fn trie_matching() {
        let t = table(&[
            "/",             // 0
            "/a",            // 1
            "/a/{x}",        // 2
            "/a/b",          // 3
            "/a/**",         // 4
            "/**",           // 5
            "/{x}/b",        // 6
            "/a/{x}/c",      // 7
            "/z/{x}/{y}/**", // 8
        ]);
        assert_eq!(matches(&t, "/"), [0, 5]);
        assert_eq!(matches(&t, "/a"), [1, 4, 5]);
        assert_eq!(matches(&t, "/a/b"), [2, 3, 4, 5, 6]);
        assert_eq!(matches(&t, "/a/q"), [2, 4, 5]);
        assert_eq!(matches(&t, "/a/q/c"), [4, 5, 7]);
        assert_eq!(matches(&t, "/q/b"), [5, 6]);
        assert_eq!(matches(&t, "/q"), [5]);
        assert_eq!(matches(&t, "/z/1"), [5]);
        assert_eq!(matches(&t, "/z/1/2"), [5, 8]);
        assert_eq!(matches(&t, "/z/1/2/3/4"), [5, 8]);
        // A trailing slash is part of the path.
        let t = table(&["/a", "/a/", "/a/**", "/b/{x}/", "/"]);
        assert_eq!(matches(&t, "/a"), [0, 2]);
        assert_eq!(matches(&t, "/a/"), [1, 2]);
        assert_eq!(matches(&t, "/a/c"), [2]);
        assert_eq!(matches(&t, "/a/c/"), [2]);
        assert_eq!(matches(&t, "/b/1/"), [3]);
        assert!(matches(&t, "/b/1").is_empty());
        assert_eq!(matches(&t, "/"), [4]);
        let t = table(&["/v1/charges"]);
        assert!(matches(&t, "/v1/charges/").is_empty());
        assert!(matches(&t, "/").is_empty());
        assert!(matches(&t, "/v1").is_empty());
        assert!(matches(&t, "/V1/charges").is_empty());
        assert!(matches(&t, "/v1/charges/x").is_empty());
        assert_eq!(matches(&t, "/v1/charges"), [0]);
    }

    #[test]
    fn constrained_parameters() {
        let t = table(&[
            "/u/{id:[0-9]+}",       // 0
            "/u/{name:[a-z]+}",     // 1
            "/u/{x}",               // 2
            "/u/me",                // 3
            "/u/{n:[0-9]+}/orders", // 4 (same regex as 0: shares its node)
            "/u/{any:.*}/**",       // 5
            "/o/{u:[0-9a-f-]{36}}", // 6
            "/e/{x:caf%C3%A9|tea}", // 7
        ]);
        assert_eq!(matches(&t, "/u/42"), [0, 2, 5]);
        assert_eq!(matches(&t, "/u/me"), [1, 2, 3, 5]);
        assert_eq!(matches(&t, "/u/Me"), [2, 5]);
        assert_eq!(matches(&t, "/u/4a"), [2, 5]);
        assert_eq!(matches(&t, "/u/42/orders"), [4, 5]);
        assert_eq!(matches(&t, "/u/x/orders"), [5]);
        assert_eq!(matches(&t, "/o/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a7f"), [6]);
        assert!(matches(&t, "/o/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a7").is_empty());
        assert!(matches(&t, "/o/3F2B8C1E-9D4A-4E6B-8F7A-2C1D0E9B8A7F").is_empty());
        // Regexes see the canonical (still percent-encoded) segment.
        assert_eq!(matches(&t, "/e/caf%C3%A9"), [7]);
        assert_eq!(matches(&t, "/e/tea"), [7]);
        assert!(matches(&t, "/e/teas").is_empty());
        assert_eq!(t.root.literals[0].0.as_ref(), "e");
        let u = &t.root.literals[2].1;
        assert_eq!(u.constrained.len(), 3);
    }
}

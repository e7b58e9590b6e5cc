//! Where each value of a policy file is: logical path → line and column.
//!
//! serde_yaml reports positions only for its own errors. Validation happens after
//! deserialisation, on plain Rust values, so a validation error carries the logical path of
//! the offending value (`egress[0].rules[1].methods[0]`, with a leading `[i]` when the
//! file is a list of workloads) and the loader converts that path into a position with a
//! [`PositionIndex`] built from the same text by yaml-rust2's event parser.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// The lines of `src` as YAML counts them: a line ends at `\r\n`, `\n` or a lone `\r`.
fn yaml_lines(src: &str) -> impl DoubleEndedIterator<Item = &str> {
    src.split('\n')
        .flat_map(|l| l.strip_suffix('\r').unwrap_or(l).split('\r'))
}

/// A 1-based line and column in a policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
}

impl Pos {
    /// Line 1, column 1.
    pub const START: Pos = Pos { line: 1, col: 1 };

    /// This position, moved back inside `src` when it lies past its end: the scanner
    /// reports an error found at the end of a file without a final newline on the line
    /// after the last one (found by fuzzing `policy_load`). Then it is the end of the
    /// last line.
    pub(crate) fn within(self, src: &str) -> Self {
        let lines = yaml_lines(src).count();
        if self.line <= lines {
            return self;
        }
        let last = yaml_lines(src).next_back().unwrap_or_default();
        Pos {
            line: lines,
            col: last.chars().count() + 1,
        }
    }

    fn from_marker(m: Marker) -> Self {
        // yaml-rust2 lines are 1-based, columns 0-based.
        Pos {
            line: m.line().max(1),
            col: m.col() + 1,
        }
    }
}

/// The kind of a file's top-level node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RootKind {
    /// No document at all (empty file, or only comments).
    Empty,
    /// A scalar.
    Scalar,
    /// A sequence: a list of workloads.
    Sequence,
    /// A mapping: one workload.
    Mapping,
}

/// A YAML syntax error found while indexing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    /// Where.
    pub pos: Pos,
    /// The parser's message.
    pub message: String,
}

/// Logical path → position of the value (and of its key, for mapping entries).
#[derive(Debug)]
pub(crate) struct PositionIndex {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    root: RootKind,
    /// Start of a second YAML document, if the file has more than one.
    second_document: Option<Pos>,
}

impl PositionIndex {
    /// Parses `src` and indexes every node of its first document.
    pub fn build(src: &str) -> Result<Self, SyntaxError> {
        let mut builder = Builder::default();
        Parser::new_from_str(src)
            .load(&mut builder, true)
            .map_err(|e| SyntaxError {
                pos: Pos::from_marker(*e.marker()).within(src),
                message: e.info().to_owned(),
            })?;
        // The parser also places a node that ends the file without a final newline (an
        // empty `-` item, say) on the line after the last one (the third finding of the
        // `policy_load` fuzz target): every position is kept inside the text.
        let mut index = builder.index;
        for pos in index.values.values_mut().chain(index.keys.values_mut()) {
            *pos = pos.within(src);
        }
        index.second_document = index.second_document.map(|p| p.within(src));
        Ok(index)
    }

    /// The kind of the top-level node.
    pub fn root(&self) -> RootKind {
        self.root
    }

    /// Where a second YAML document starts, if there is one.
    pub fn second_document(&self) -> Option<Pos> {
        self.second_document
    }

    /// Position of the value at `path`.
    pub fn value(&self, path: &str) -> Option<Pos> {
        self.values.get(path).copied()
    }

    /// Position of the key of the mapping entry at `path`.
    #[cfg_attr(not(test), allow(dead_code, reason = "kept for key-level errors"))]
    pub fn key(&self, path: &str) -> Option<Pos> {
        self.keys.get(path).copied()
    }

    /// Position of the value at `path`, or of its nearest indexed ancestor, or 1:1.
    pub fn locate(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.value(p) {
                return pos;
            }
            match parent(p) {
                Some(up) => p = up,
                None => return Pos::START,
            }
        }
    }
}

/// `a.b[1]` → `a.b`, `a.b` → `a`, `a` → ``, `` → none.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Joins a logical path and a relative one: `join("egress[0]", "rules[1]")` is
/// `egress[0].rules[1]`, `join("[2]", "workload")` is `[2].workload`, and
/// `join("a", "[0]")` is `a[0]`.
pub(crate) fn join(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_owned()
    } else if rel.is_empty() || rel.starts_with('[') {
        format!("{prefix}{rel}")
    } else {
        format!("{prefix}.{rel}")
    }
}

enum Frame {
    /// A mapping at `path`; `key` is the key whose value comes next, or `None` when the
    /// next node is a key; `keys` counts the keys seen.
    Map {
        path: String,
        key: Option<String>,
        keys: usize,
    },
    /// A sequence at `path`; `next` is the index of the next item.
    Seq { path: String, next: usize },
}

struct Builder {
    stack: Vec<Frame>,
    index: PositionIndex,
    documents: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            stack: Vec::new(),
            index: PositionIndex {
                values: HashMap::new(),
                keys: HashMap::new(),
                root: RootKind::Empty,
                second_document: None,
            },
            documents: 0,
        }
    }
}

#[derive(Clone, Copy)]
enum Node {
    Leaf,
    Map,
    Seq,
}

impl Builder {
    fn node(&mut self, scalar: Option<&str>, pos: Pos, node: Node) {
        let path = match self.stack.last_mut() {
            None => {
                self.index.root = match node {
                    Node::Leaf => RootKind::Scalar,
                    Node::Map => RootKind::Mapping,
                    Node::Seq => RootKind::Sequence,
                };
                String::new()
            }
            Some(Frame::Map { path, key, keys }) => match key.take() {
                Some(k) => join(path, &k),
                None => {
                    // This node is a key. Non-scalar keys are not part of the schema; give
                    // them a placeholder so their contents do not disturb the index.
                    let k = scalar.unwrap_or("?").to_owned();
                    self.index.keys.entry(join(path, &k)).or_insert(pos);
                    *keys += 1;
                    if *keys == 1 {
                        // yaml-rust2 marks a block mapping at the ':' of its first key;
                        // point at the key instead.
                        if let Some(start) = self.index.values.get_mut(path.as_str()) {
                            *start = (*start).min(pos);
                        }
                    }
                    let key_path = join(path, "?key");
                    *key = Some(k);
                    self.open(key_path, node);
                    return;
                }
            },
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                p
            }
        };
        self.index.values.entry(path.clone()).or_insert(pos);
        self.open(path, node);
    }

    fn open(&mut self, path: String, node: Node) {
        match node {
            Node::Leaf => {}
            Node::Map => self.stack.push(Frame::Map {
                path,
                key: None,
                keys: 0,
            }),
            Node::Seq => self.stack.push(Frame::Seq { path, next: 0 }),
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        if let Event::DocumentStart = ev {
            self.documents += 1;
            if self.documents == 2 {
                self.index.second_document = Some(pos);
            }
            return;
        }
        if self.documents > 1 {
            return; // only the first document is indexed
        }
        match ev {
            Event::Scalar(value, ..) => self.node(Some(&value), pos, Node::Leaf),
            Event::Alias(_) => self.node(None, pos, Node::Leaf),
            Event::MappingStart(..) => self.node(None, pos, Node::Map),
            Event::SequenceStart(..) => self.node(None, pos, Node::Seq),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn at(line: usize, col: usize) -> Option<Pos> {
        Some(Pos { line, col })
    }

    #[test]
    fn indexes_block_and_flow_values() {
        let src = "\
workload: billing
select:
  cgroup: /system.slice/billing.service
egress:
  - host: api.example.com
    port: 443
    rules:
      - id: a
        methods: [POST, \"get\"]
        path: /v1/charges
";
        let idx = PositionIndex::build(src).unwrap();
        assert_eq!(idx.root(), RootKind::Mapping);
        assert_eq!(idx.value("workload"), at(1, 11));
        assert_eq!(idx.key("workload"), at(1, 1));
        assert_eq!(idx.value("select.cgroup"), at(3, 11));
        assert_eq!(idx.value("egress[0].host"), at(5, 11));
        assert_eq!(idx.value("egress[0].port"), at(6, 11));
        assert_eq!(idx.value("egress[0].rules[0].id"), at(8, 13));
        assert_eq!(idx.value("egress[0].rules[0].methods[0]"), at(9, 19));
        assert_eq!(idx.value("egress[0].rules[0].methods[1]"), at(9, 25));
        assert_eq!(idx.value("egress[0].rules[0].path"), at(10, 15));
        assert_eq!(idx.value("egress[0].rules[0]"), at(8, 9));
        assert_eq!(idx.value("select"), at(3, 3));
        assert_eq!(idx.value(""), at(1, 1));
        assert_eq!(idx.locate("egress[0].rules[0].nope"), at(8, 9).unwrap());
        assert_eq!(idx.locate("zzz"), Pos::START);
    }

    #[test]
    fn indexes_lists_of_workloads() {
        let src = "- workload: a\n- workload: b\n  egress: []\n";
        let idx = PositionIndex::build(src).unwrap();
        assert_eq!(idx.root(), RootKind::Sequence);
        assert_eq!(idx.value("[0].workload"), at(1, 13));
        assert_eq!(idx.value("[1].workload"), at(2, 13));
        assert_eq!(idx.value("[1].egress"), at(3, 11));
    }

    #[test]
    fn empty_and_multi_document() {
        assert_eq!(
            PositionIndex::build("# nothing\n").unwrap().root(),
            RootKind::Empty
        );
        let idx = PositionIndex::build("a: 1\n---\nb: 2\n").unwrap();
        assert_eq!(idx.second_document(), at(2, 1));
        assert_eq!(idx.value("b"), None);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = PositionIndex::build("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e:?}");
    }

    #[test]
    fn a_syntax_error_at_the_end_of_a_file_without_newline_is_inside_it() {
        // The fuzz target policy_load found the scanner's line 4 for this three-line text.
        let src = "a:\n  b: 1\nc d";
        let raw = Parser::new_from_str(src)
            .load(&mut Builder::default(), true)
            .unwrap_err();
        assert_eq!(
            Pos::from_marker(*raw.marker()).line,
            4,
            "the scanner's own line"
        );
        let e = PositionIndex::build(src).unwrap_err();
        assert_eq!(e.pos, Pos { line: 3, col: 4 }, "{e:?}");
        let last = src.split('\n').nth(e.pos.line - 1).unwrap();
        assert!(e.pos.col <= last.chars().count() + 1, "{e:?}");
        assert_eq!(
            Pos { line: 9, col: 4 }.within("ab\ncd"),
            Pos { line: 2, col: 3 }
        );
        assert_eq!(
            Pos { line: 2, col: 1 }.within("ab\ncd"),
            Pos { line: 2, col: 1 }
        );
        // A lone CR ends a line for YAML (and for the positions serde_yaml reports).
        assert_eq!(
            Pos { line: 3, col: 1 }.within("a\rb\r\nc"),
            Pos { line: 3, col: 1 }
        );
        assert_eq!(
            Pos { line: 4, col: 1 }.within("a\rb\r\nc"),
            Pos { line: 3, col: 2 }
        );
    }

    #[test]
    fn a_node_at_the_end_of_a_file_without_newline_is_inside_it() {
        // From the fuzz target policy_load: an empty last list item, no final newline.
        let src = "egress:\n  -";
        let mut raw = Builder::default();
        Parser::new_from_str(src).load(&mut raw, true).unwrap();
        assert_eq!(
            raw.index.values["egress[0]"].line, 3,
            "the parser's own line"
        );
        let idx = PositionIndex::build(src).unwrap();
        let pos = idx.value("egress[0]").unwrap();
        assert!(pos.line <= 2, "{pos:?}");
        assert!(pos.col <= 4, "{pos:?}");
    }

    #[test]
    fn join_paths() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a", "b"), "a.b");
        assert_eq!(join("a", "[0]"), "a[0]");
        assert_eq!(join("[1]", "b"), "[1].b");
        assert_eq!(join("a", ""), "a");
        assert_eq!(parent("a.b[1]"), Some("a.b"));
        assert_eq!(parent("[1]"), Some(""));
    }
}

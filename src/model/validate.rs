//! Field-path validation: a `Validator` walks a resource, keeping the JSON path of the member it
//! is looking at, and collects every problem as `path: what is wrong`. The generated shapes
//! (`shapes/`) call its scalar checks; App Mesh's cross-field rules (`rules`) add their own.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex};

/// One problem with a request, with the JSON path of the member it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted JSON path, e.g. `spec.listeners[0].healthCheck.intervalMillis`.
    pub path: String,
    /// What is wrong, e.g. `must be between 5000 and 300000, got 10`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All the problems found in one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// Implemented by every App Mesh shape: report each violated constraint to `v`.
pub trait Validate {
    fn validate(&self, v: &mut Validator);
}

impl<T: Validate> Validate for Option<T> {
    fn validate(&self, v: &mut Validator) {
        if let Some(x) = self {
            x.validate(v);
        }
    }
}

/// Walks a value and records errors against the current path.
#[derive(Debug, Default)]
pub struct Validator {
    path: Vec<Segment>,
    errors: Vec<FieldError>,
}

#[derive(Debug, Clone)]
enum Segment {
    Field(String),
    Index(usize),
}

// === impl Validator ===

impl Validator {
    /// A validator whose paths start at `root` (e.g. `spec`); empty for the request body itself.
    pub fn at(root: &str) -> Self {
        let mut v = Self::default();
        if !root.is_empty() {
            v.path.push(Segment::Field(root.to_string()));
        }
        v
    }

    /// Runs `f` one member deeper.
    pub fn field(&mut self, name: &str, f: impl FnOnce(&mut Self)) {
        self.path.push(Segment::Field(name.to_string()));
        f(self);
        self.path.pop();
    }

    /// Runs `f` one list element deeper.
    pub fn index(&mut self, i: usize, f: impl FnOnce(&mut Self)) {
        self.path.push(Segment::Index(i));
        f(self);
        self.path.pop();
    }

    /// The current path, rendered as App Mesh users write it.
    pub fn path(&self) -> String {
        render(&self.path)
    }

    /// Records a problem at the current path.
    pub fn error(&mut self, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: self.path(),
            message: message.into(),
        });
    }

    /// Records a problem at a member of the current path.
    pub fn error_at(&mut self, member: &str, message: impl Into<String>) {
        self.field(member, |v| v.error(message));
    }

    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn finish(self) -> Result<(), FieldErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(FieldErrors(self.errors))
        }
    }

    /// String length in characters, as the model counts it.
    pub fn length(&mut self, s: &str, min: usize, max: usize) {
        let n = s.chars().count();
        if n < min || n > max {
            if max == usize::MAX {
                self.error(format!("must be at least {min} characters long, got {n}"));
            } else if min == 0 {
                self.error(format!("must be at most {max} characters long, got {n}"));
            } else {
                self.error(format!(
                    "must be between {min} and {max} characters long, got {n}"
                ));
            }
        }
    }

    pub fn range(&mut self, x: i64, min: i64, max: i64) {
        if x < min || x > max {
            if max == i64::MAX {
                self.error(format!("must be at least {min}, got {x}"));
            } else {
                self.error(format!("must be between {min} and {max}, got {x}"));
            }
        }
    }

    pub fn count(&mut self, n: usize, min: usize, max: usize) {
        if n < min || n > max {
            if max == usize::MAX {
                self.error(format!("must have at least {min} items, got {n}"));
            } else {
                self.error(format!("must have between {min} and {max} items, got {n}"));
            }
        }
    }

    pub fn pattern(&mut self, s: &str, pattern: &'static str) {
        static CACHE: LazyLock<Mutex<HashMap<&'static str, Option<regex::Regex>>>> =
            LazyLock::new(Default::default);
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let re = cache
            .entry(pattern)
            .or_insert_with(|| regex::Regex::new(pattern).ok());
        match re {
            Some(re) if !re.is_match(s) => {
                self.error(format!("must match the pattern {pattern}, got {s:?}"))
            }
            Some(_) => {}
            // A model pattern this regex engine cannot read must not silently pass everything.
            None => self.error(format!(
                "cannot be checked: the model's pattern {pattern} does not compile"
            )),
        }
    }

    /// A union must have exactly one member set.
    pub fn union(&mut self, members: &[&str], set: &[bool]) {
        let n = set.iter().filter(|s| **s).count();
        if n == 1 {
            return;
        }
        let names = members.join(", ");
        if n == 0 {
            self.error(format!("must set exactly one of: {names}"));
        } else {
            let given: Vec<&str> = members
                .iter()
                .zip(set)
                .filter(|(_, s)| **s)
                .map(|(m, _)| *m)
                .collect();
            self.error(format!(
                "must set exactly one of: {names}; got {}",
                given.join(" and ")
            ));
        }
    }
}

fn render(path: &[Segment]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Segment::Field(f) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(f);
            }
            Segment::Index(i) => {
                s.push_str(&format!("[{i}]"));
            }
        }
    }
    s
}

/// Validates `value` with paths rooted at `root`.
pub fn check<T: Validate>(root: &str, value: &T) -> Result<(), FieldErrors> {
    let mut v = Validator::at(root);
    value.validate(&mut v);
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_like_app_mesh_docs() {
        let mut v = Validator::at("spec");
        v.field("listeners", |v| {
            v.index(0, |v| {
                v.field("healthCheck", |v| {
                    v.field("intervalMillis", |v| v.range(10, 5000, 300000))
                })
            })
        });
        assert_eq!(
            v.finish().unwrap_err().to_string(),
            "spec.listeners[0].healthCheck.intervalMillis: must be between 5000 and 300000, got 10"
        );
    }

    #[test]
    fn union_reports_what_was_given() {
        let mut v = Validator::at("spec");
        v.union(&["http", "tcp"], &[true, true]);
        v.union(&["http", "tcp"], &[false, false]);
        let e = v.finish().unwrap_err();
        assert_eq!(
            e.0[0].message,
            "must set exactly one of: http, tcp; got http and tcp"
        );
        assert_eq!(e.0[1].message, "must set exactly one of: http, tcp");
    }

    #[test]
    fn lengths_count_characters() {
        let mut v = Validator::default();
        v.length("ééé", 1, 3);
        assert!(v.is_ok());
        v.length("", 1, 3);
        assert!(!v.is_ok());
    }
}

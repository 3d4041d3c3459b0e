//! Enums chosen by name (a CLI flag, a Python argument, a trace's format): `named_enum!` writes
//! each one's `ALL`, `as_str`, `Display` and `FromStr`, so that every such choice parses the same
//! way (case, surrounding spaces and `_` for `-` do not matter) and a bad name gets the same
//! error: `unknown <what> "<name>": expected one of <the names>`.

/// An enum whose variants each have a name (and optionally aliases that also parse):
///
/// ```text
/// named_enum! {
///     /// Docs and derives as usual.
///     #[derive(Debug, Clone, Copy, PartialEq, Eq)]
///     pub enum RouterKind("router") {
///         /// In turn.
///         RoundRobin = "round-robin",
///         Forecast = "forecast" | "horae",
///     }
/// }
/// ```
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $s:literal $(| $alias:literal)* ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [$name; [$($s),+].len()] = [$($name::$variant),+];

            /// The name it parses from and prints as.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $( $name::$variant => $s ),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::error::HoraeError;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                let key = s.trim().to_ascii_lowercase().replace('_', "-");
                match key.as_str() {
                    $( $s $(| $alias)* => Ok($name::$variant), )+
                    _ => {
                        let names: Vec<&str> = $name::ALL.iter().map(|k| k.as_str()).collect();
                        Err($crate::error::HoraeError::InvalidConfig(format!(
                            "unknown {} {:?}: expected one of {}",
                            $what,
                            s,
                            names.join(", ")
                        )))
                    }
                }
            }
        }
    };
}

pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    named_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Colour("colour") {
            Red = "red",
            DarkBlue = "dark-blue" | "navy",
        }
    }

    #[test]
    fn names_aliases_and_errors() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkBlue]);
        assert_eq!(Colour::DarkBlue.to_string(), "dark-blue");
        for s in ["dark-blue", " Dark_Blue ", "navy"] {
            assert_eq!(s.parse::<Colour>().unwrap(), Colour::DarkBlue, "{s}");
        }
        let e = "green".parse::<Colour>().unwrap_err().to_string();
        assert!(e.contains(r#"unknown colour "green": expected one of red, dark-blue"#), "{e}");
    }
}

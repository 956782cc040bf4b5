//! Who is who in the mesh (DESIGN §5): the mesh CA's certificates (`ca`), SPIFFE names
//! (`spiffe`), rustls configs (`tls`), the secrets the control plane hands out (`secret`:
//! join tokens, access keys) and AWS Signature Version 4 (`sigv4`). Pure functions on PEM and
//! bytes; the control plane and the proxy both build on them.

pub mod ca;
pub mod secret;
pub mod sigv4;
pub mod spiffe;
pub mod tls;

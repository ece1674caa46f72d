//! Annotation as pure functions: the model of a project and of what a rater saves
//! ([`model`]), label maps on the image's own grid ([`labelmap`]), the formats other tools read ([`coco`], [`via`], [`cvat`], DICOM SEG in [`seg`]),
//! agreement between raters ([`agreement`]) and their consensus ([`consensus`]). Storage (the
//! catalog's tables, label-map files written durably, the audit chain) and the commands live in
//! the node; nothing here does I/O.

pub mod agreement;
pub mod coco;
pub mod consensus;
pub mod cvat;
pub mod labelmap;
pub mod model;
pub mod seg;
pub mod via;

pub use labelmap::{Grid, LabelMap};
pub use model::{Content, Kind, LabelClass, Project, Source};

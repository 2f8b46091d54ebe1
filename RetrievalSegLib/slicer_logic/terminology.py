"""Standard terminology (DICOM / SNOMED CT codes) for the segments RetrievalSeg creates.

Slicer shows a segment's meaning from its terminology tag (`vtkSegment.GetTerminologyEntryTagName()`,
"TerminologyEntry"), serialized as `vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry`
writes it (Slicer 5.10): context~category~type~type modifier~region context~region~region modifier,
each code as scheme^value^meaning. A bank label whose name is a structure of Slicer's built-in
"3D Slicer General Anatomy list" (always loaded, so nothing has to be shipped or registered) gets
that structure's codes; any other name (e.g. "Myo", which the list lacks) gets none rather than a
guess. The table below is the list's "Anatomical Structure" category, copied from Slicer v5.10.0
`Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json`
(scheme|value|meaning|modifiers), plus the abbreviations of the ACDC cardiac labels.
"""
from __future__ import annotations

import re

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
CATEGORY = ("SCT", "123037004", "Anatomical Structure")
MODIFIERS = {"Left": ("SCT", "7771000", "Left"), "Right": ("SCT", "24028007", "Right")}
#: Common abbreviations -> a meaning of the table (ACDC: LV, RV).
ALIASES = {"lv": "left ventricle", "rv": "right ventricle"}

_TABLE = (
    "SCT|113345001|Abdomen|",
    "SCT|52731004|Abdominal cavity|",
    "SCT|195879000|Abdominal wall muscle|",
    "SCT|62818001|Adenohypophysis|",
    "SCT|23451007|Adrenal gland|Right,Left",
    "SCT|4958002|Amygdala|Right,Left",
    "SCT|53505006|Anus|",
    "SCT|15825003|Aorta|",
    "SCT|34202007|Aortic Valve|",
    "SCT|75042008|Arachnoid|",
    "FMA|276650|Arcuate Fasciculus|Right,Left",
    "SCT|53520000|Autonomic nerve|",
    "SCT|28273000|Bile Duct|",
    "SCT|89837001|Bladder|",
    "SCT|272710004|Bone of thorax|",
    "SCT|312779009|Bone structure of head and/or neck|",
    "SCT|12738006|Brain|",
    "SCT|280371009|Brain cerebrospinal fluid pathway|",
    "SCT|35764002|Brain ventricle|",
    "SCT|11000004|Caudate nucleus|Right,Left",
    "SCT|21483005|Central nervous system|",
    "SCT|33060004|Cerebellar white matter|",
    "SCT|80447000|Cerebral aqueduct|",
    "SCT|87463005|Cerebral fornix|Right,Left",
    "SCT|40146001|Cerebral Grey Matter|",
    "SCT|68523003|Cerebral White Matter|",
    "SCT|389081007|Gray Matter|",
    "SCT|389080008|White Matter|",
    "SCT|10200004|Liver|",
    "SCT|70925003|Maxilla|",
    "SCT|61962009|Midbrain|",
    "SCT|3120008|Pleura|",
    "SCT|113197003|Rib|",
    "SCT|78961009|Spleen|",
    "SCT|11628009|Telencephalon|",
    "SCT|88882009|Vagus nerve|",
    "SCT|122494005|Cervical spine|",
    "SCT|51185008|Chest|",
    "SCT|372074006|Chest wall muscle|",
    "SCT|37035000|Cingulum|Right,Left",
    "SCT|51299004|Clavicle|Right,Left",
    "SCT|71854001|Colon|",
    "SCT|88442005|Corpus callosum|",
    "SCT|31428008|Corpus striatum|Right,Left",
    "SCT|25238003|Cranial nerve|",
    "SCT|87563008|Diencephalon|",
    "SCT|38848004|Duodenum|",
    "SCT|18545000|Dura mater|",
    "SCT|32849002|Esophagus|",
    "SCT|28347008|External ear|Right,Left",
    "SCT|79652003|Eyeball|Right,Left",
    "SCT|86969008|Female external genitalia|",
    "SCT|87759004|Female internal genitalia|",
    "SCT|56459004|Foot|Right,Left",
    "SCT|14975008|Forearm|Right,Left",
    "SCT|35918002|Fourth ventricle|",
    "SCT|74872008|Frontal bone|Right,Left",
    "SCT|83251001|Frontal lobe|Right,Left",
    "SCT|28231008|Gallbladder|",
    "SCT|14738005|Globus pallidus|Right,Left",
    "SCT|85562004|Hand|Right,Left",
    "SCT|69536005|Head|",
    "SCT|80891009|Heart|",
    "SCT|21387005|Hyoid bone|",
    "SCT|67701001|Inferior cerebellar peduncle|Right,Left",
    "SCT|55233005|Inferior longitudinal fasciculus|Right,Left",
    "SCT|22945000|Inner ear|Right,Left",
    "SCT|36169008|Insula|Right,Left",
    "SCT|58095006|Interatrial septum|",
    "SCT|589001|Interventricular septum|",
    "SCT|64033007|Kidney|Right,Left",
    "SCT|72696002|Knee|Right,Left",
    "SCT|6229007|Lacrimal bone|Right",
    "SCT|4596009|Larynx|",
    "SCT|461002|Lateral corticospinal tract|Right,Left",
    "SCT|66720007|Lateral ventricle|Right,Left",
    "SCT|87878005|Left Ventricle|",
    "SCT|279215006|Limbic lobe|Right,Left",
    "SCT|48477009|Lip|",
    "SCT|30021000|Lower leg|Right,Left",
    "SCT|61685007|Lower limb|Right,Left",
    "SCT|90572001|Lower lobe of lung|Right,Left",
    "SCT|122496007|Lumbar spine|",
    "SCT|39607008|Lung|Right,Left",
    "SCT|90418005|Male external genitalia|",
    "SCT|38242008|Male internal genitalia|",
    "SCT|91609006|Mandible|",
    "SCT|30114003|Medial Lemniscus|Right,Left",
    "SCT|72410000|Mediastinum|",
    "SCT|1231004|Meninges|",
    "SCT|33723005|Middle cerebellar peduncle|Right,Left",
    "SCT|25342003|Middle ear|Right,Left",
    "SCT|72481006|Middle lobe of right lung|",
    "SCT|91134007|Mitral Valve|",
    "SCT|22688005|Muscle of head|",
    "SCT|81727001|Muscle of neck|",
    "SCT|45048000|Neck|",
    "SCT|37512009|Neurohypophysis|",
    "SCT|31065004|Occipital lobe|Right,Left",
    "SCT|27398004|Omentum|",
    "SCT|244453006|Optic chiasm|",
    "SCT|70105001|Optic radiation|Right,Left",
    "SCT|53238003|Optic tract|Right,Left",
    "SCT|15497006|Ovary|Right,Left",
    "SCT|51283005|Palatine bone|Right,Left",
    "SCT|15776009|Pancreas|",
    "SCT|24924006|Parietal bone|Right,Left",
    "SCT|31640002|Occipital bone|",
    "SCT|87166008|Vomer bone|",
    "SCT|16630005|Parietal lobe|Right,Left",
    "SCT|25489000|Pericardial cavity|",
    "SCT|76848001|Pericardium|",
    "SCT|84782009|Peripheral nerve|",
    "SCT|3058005|Peripheral nervous system|",
    "SCT|15425007|Peritioneum|",
    "SCT|83670000|Peritoneal cavity|",
    "SCT|54066008|Pharynx|",
    "SCT|23180006|Pia mater|",
    "SCT|45793000|Pineal Gland|",
    "SCT|56329008|Pituitary|",
    "SCT|279336005|Posterior cerebral commissure|",
    "SCT|41216001|Prostate|",
    "SCT|39057004|Pulmonary valve|",
    "SCT|89278009|Putamen|Right,Left",
    "SCT|82849001|Retroperitoneal space|",
    "SCT|53085002|Right Ventricle|",
    "SCT|385294005|Salivary gland|",
    "SCT|64739004|Seminal Vesicle|Right,Left",
    "SCT|16982005|Shoulder|Right,Left",
    "SCT|75093004|Skin of abdomen|",
    "SCT|74160004|Skin of chest|",
    "SCT|89546000|Skull|",
    "SCT|30315005|Small Intestine|",
    "SCT|49460000|Soft palate|",
    "SCT|2748008|Spinal cord|",
    "SCT|12958003|Spinal cord gray matter|",
    "SCT|27088001|Spinal cord white matter|",
    "SCT|56873002|Sternum|",
    "SCT|69695003|Stomach|",
    "SCT|35951006|Subarachnoid space|",
    "SCT|70007007|Substantia nigra|Right,Left",
    "SCT|89202009|Superior longitudinal fasciculus|Right,Left",
    "SCT|60911003|Temporal bone|Right,Left",
    "SCT|78277001|Temporal lobe|Right,Left",
    "SCT|119406000|Thalamus|Right,Left",
    "SCT|68367000|Thigh|Right,Left",
    "SCT|122495006|Thoracic spine|",
    "SCT|51185008|Thorax|",
    "SCT|9875009|Thymus|",
    "SCT|9875009|Thymus Gland|",
    "SCT|69748006|Thyroid|",
    "SCT|21974007|Tongue|",
    "SCT|38199008|Tooth|",
    "SCT|44567001|Trachea|",
    "SCT|46030003|Tricuspid Valve|",
    "SCT|26230003|Uncinate fasciculus|Right,Left",
    "SCT|40983000|Upper arm|Right,Left",
    "SCT|53120007|Upper limb|Right,Left",
    "SCT|45653009|Upper lobe of lung|Right,Left",
    "SCT|13648007|Urethra|",
    "SCT|122489005|Urinary system|",
    "SCT|35039007|Uterus|",
    "SCT|76784001|Vagina|",
    "SCT|57671007|Vas deferens|Right,Left",
    "SCT|13881006|Zygoma|Right",
)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


_TYPES = {_key(meaning): (scheme, value, meaning, tuple(m for m in mods.split(",") if m))
          for scheme, value, meaning, mods in (row.split("|") for row in _TABLE)}


def terminology_entry(label_name: str) -> str | None:
    """Slicer's serialized terminology entry for a label name, or None when it names no known structure.

    "Liver", "left kidney", "Kidney right", "kidney_left" and "LV" are known; a side is kept only
    where the list has Left/Right modifiers for that structure.
    """
    words = _key(label_name).split()
    side = next((w.capitalize() for w in words if w in ("left", "right")), None)
    bare = " ".join(w for w in words if w not in ("left", "right"))
    found = _TYPES.get(_key(ALIASES.get(_key(label_name), label_name)))
    modifier = None
    if found is None and side is not None and bare in _TYPES and side in _TYPES[bare][3]:
        found, modifier = _TYPES[bare], MODIFIERS[side]
    if found is None:
        return None
    scheme, value, meaning, _ = found
    codes = [CATEGORY, (scheme, value, meaning), modifier or ("", "", "")]
    parts = [CONTEXT, *("^".join(c) for c in codes), "", "^^", "^^"]
    return "~".join(parts)

"""SMACT 2.2.1 element data used by CDVAE's compositional-validity test.

Carried verbatim (as data) from SMACT 2.2.1 (MIT licence, Davies et al., J. Open Source Softw.
4, 1361 (2019); https://github.com/WMD-group/SMACT), the version pinned in CDVAE's environment
(txie-93/cdvae env.yml / env.common.yml: ``smact==2.2.1``):

* ``OXIDATION_STATES``: ``smact/data/oxidation_states.txt`` (``Element.oxidation_states``, the
  default list); SMACT 4 changed these defaults (e.g. Ca is ``[2]`` there, ``[1, 2]`` here).
* ``PAULING_ENEG``: ``el_neg`` column of ``smact/data/element_data.txt``
  (``Element.pauling_eneg``); ``None`` where SMACT has no value. The 2.2.1 table has
  Zr = 0.33 (later versions: 1.33); kept as is because CDVAE's numbers were computed with it.
* ``METALS``: ``smact.metals``.

Generated from the installed SMACT 2.2.1 package; do not edit by hand.
"""

# symbol: (Z, oxidation states, Pauling electronegativity or None)
ELEMENTS: dict[str, tuple[int, tuple[int, ...], float | None]] = {
    "H": (1, (-1, 1), 2.2),
    "He": (2, (), None),
    "Li": (3, (1,), 0.98),
    "Be": (4, (1, 2), 1.57),
    "B": (5, (1, 2, 3), 2.04),
    "C": (6, (-4, -3, -2, -1, 1, 2, 3, 4), 2.55),
    "N": (7, (-3, -2, -1, 1, 2, 3, 4, 5), 3.04),
    "O": (8, (-2, -1, 1, 2), 3.44),
    "F": (9, (-1,), 3.98),
    "Ne": (10, (), None),
    "Na": (11, (-1, 1), 0.93),
    "Mg": (12, (1, 2), 1.31),
    "Al": (13, (1, 2, 3), 1.61),
    "Si": (14, (-4, -3, -2, -1, 1, 2, 3, 4), 1.9),
    "P": (15, (-3, -2, -1, 1, 2, 3, 4, 5), 2.19),
    "S": (16, (-2, -1, 1, 2, 3, 4, 5, 6), 2.58),
    "Cl": (17, (-1, 1, 2, 3, 4, 5, 6, 7), 3.16),
    "Ar": (18, (), None),
    "K": (19, (-1, 1), 0.82),
    "Ca": (20, (1, 2), 1.0),
    "Sc": (21, (1, 2, 3), 1.36),
    "Ti": (22, (-1, 1, 2, 3, 4), 1.54),
    "V": (23, (-1, 1, 2, 3, 4, 5), 1.63),
    "Cr": (24, (-2, -1, 1, 2, 3, 4, 5, 6), 1.66),
    "Mn": (25, (-3, -2, -1, 1, 2, 3, 4, 5, 6, 7), 1.55),
    "Fe": (26, (-2, -1, 1, 2, 3, 4, 5, 6), 1.83),
    "Co": (27, (-1, 1, 2, 3, 4, 5), 1.88),
    "Ni": (28, (-1, 1, 2, 3, 4), 1.91),
    "Cu": (29, (1, 2, 3, 4), 1.9),
    "Zn": (30, (1, 2), 1.65),
    "Ga": (31, (1, 2, 3), 1.81),
    "Ge": (32, (-4, -3, -2, -1, 1, 2, 3, 4), 2.01),
    "As": (33, (-3, 1, 2, 3, 5), 2.18),
    "Se": (34, (-2, 1, 2, 4, 6), 2.55),
    "Br": (35, (-1, 1, 2, 3, 4, 5, 7), 2.96),
    "Kr": (36, (2,), 3.0),
    "Rb": (37, (-1, 1), 0.82),
    "Sr": (38, (1, 2), 0.95),
    "Y": (39, (1, 2, 3), 1.22),
    "Zr": (40, (1, 2, 3, 4), 0.33),
    "Nb": (41, (-1, 1, 2, 3, 4, 5), 1.6),
    "Mo": (42, (-2, -1, 1, 2, 3, 4, 5, 6), 2.16),
    "Tc": (43, (-3, -1, 1, 2, 3, 4, 5, 6, 7), 2.1),
    "Ru": (44, (-2, 1, 2, 3, 4, 5, 6, 7, 8), 2.2),
    "Rh": (45, (-1, 1, 2, 3, 4, 5, 6), 2.28),
    "Pd": (46, (1, 2, 4, 6), 2.2),
    "Ag": (47, (1, 2, 3, 4), 1.93),
    "Cd": (48, (1, 2), 1.69),
    "In": (49, (1, 2, 3), 1.78),
    "Sn": (50, (-4, 2, 4), 1.96),
    "Sb": (51, (-3, 3, 5), 2.05),
    "Te": (52, (-2, 2, 4, 5, 6), 2.1),
    "I": (53, (-1, 1, 3, 4, 5, 7), 2.66),
    "Xe": (54, (1, 2, 4, 6, 8), 2.6),
    "Cs": (55, (-1, 1), 0.79),
    "Ba": (56, (2,), 0.89),
    "La": (57, (2, 3), 1.1),
    "Ce": (58, (2, 3, 4), 1.12),
    "Pr": (59, (2, 3, 4), 1.13),
    "Nd": (60, (2, 3, 4), 1.14),
    "Pm": (61, (2, 3), None),
    "Sm": (62, (2, 3), 1.17),
    "Eu": (63, (2, 3), 1.2),
    "Gd": (64, (1, 2, 3), 1.2),
    "Tb": (65, (1, 2, 3, 4), 1.2),
    "Dy": (66, (2, 3, 4), 1.22),
    "Ho": (67, (2, 3), 1.23),
    "Er": (68, (2, 3), 1.24),
    "Tm": (69, (2, 3), 1.25),
    "Yb": (70, (2, 3), 1.1),
    "Lu": (71, (3,), 1.0),
    "Hf": (72, (2, 3, 4), 1.3),
    "Ta": (73, (-1, 2, 3, 4, 5), 1.5),
    "W": (74, (-2, -1, 1, 2, 3, 4, 5, 6), 1.7),
    "Re": (75, (-3, -1, 1, 2, 3, 4, 5, 6, 7), 1.9),
    "Os": (76, (-2, -1, 1, 2, 3, 4, 5, 6, 7, 8), 2.2),
    "Ir": (77, (-2, -1, 1, 2, 3, 4, 5, 6, 7, 8), 2.2),
    "Pt": (78, (-2, -1, 1, 2, 3, 4, 5, 6), 2.2),
    "Au": (79, (-1, 1, 2, 3, 5), 2.4),
    "Hg": (80, (1, 2, 4), 1.9),
    "Tl": (81, (-1, 1, 3), 1.8),
    "Pb": (82, (-4, 2, 4), 1.8),
    "Bi": (83, (-3, 1, 3, 5, 7), 1.9),
    "Po": (84, (-2, 2, 4, 5, 6), 2.0),
    "At": (85, (-1, 1, 3, 5, 7), 2.2),
    "Rn": (86, (2, 6), None),
    "Fr": (87, (1,), 0.7),
    "Ra": (88, (2,), 0.9),
    "Ac": (89, (2, 3), 1.1),
    "Th": (90, (2, 3, 4), 1.3),
    "Pa": (91, (2, 3, 4, 5), 1.5),
    "U": (92, (2, 3, 4, 5, 6), 1.7),
    "Np": (93, (3, 4, 5, 6, 7), 1.3),
    "Pu": (94, (2, 3, 4, 5, 6, 7, 8), 1.3),
    "Am": (95, (2, 3, 4, 5, 6, 7), 1.3),
    "Cm": (96, (2, 3, 4, 6, 8), 1.3),
    "Bk": (97, (2, 3, 4), 1.3),
    "Cf": (98, (2, 3, 4), 1.3),
    "Es": (99, (2, 3, 4), 1.3),
    "Fm": (100, (2, 3), 1.3),
    "Md": (101, (2, 3), 1.3),
    "No": (102, (2, 3), 1.3),
    "Lr": (103, (3,), None),
}

METALS: frozenset[str] = frozenset(
    "Li Be Na Mg Al K Ca Sc Ti V Cr Mn Fe Co Ni Cu "
    "Zn Ga Ge Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In "
    "Sn Sb Cs Ba La Ce Pr Nd Sm Eu Gd Tb Dy Ho Er Tm "
    "Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po Fr "
    "Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No ".split()
)

OXIDATION_STATES: dict[str, tuple[int, ...]] = {s: v[1] for s, v in ELEMENTS.items()}
PAULING_ENEG: dict[str, float | None] = {s: v[2] for s, v in ELEMENTS.items()}
SYMBOL_BY_Z: dict[int, str] = {v[0]: s for s, v in ELEMENTS.items()}

// SPDX-License-Identifier: GPL-2.0
/* lp-cmdline-v2: the same patch with another text, as an atomic-replace (cumulative) patch. */
#define LP_TEXT "hot-livepatch: cmdline patched v2"
#define LP_REPLACE true
#include "lp-cmdline.c"

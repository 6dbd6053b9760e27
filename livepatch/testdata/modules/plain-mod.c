// SPDX-License-Identifier: GPL-2.0
/* plain-mod: an ordinary module without MODULE_INFO(livepatch, "Y"); hot must refuse to load it. */
#include <linux/module.h>

static int __init plain_init(void)
{
	return 0;
}

static void __exit plain_exit(void)
{
}

module_init(plain_init);
module_exit(plain_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("hot test: not a livepatch");

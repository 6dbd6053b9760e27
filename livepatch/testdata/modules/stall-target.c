// SPDX-License-Identifier: GPL-2.0
/*
 * stall-target: an ordinary module with /proc/hot_stall. A read of that file sleeps
 * (uninterruptibly) inside hot_stall_wait() until "1" is written to the file. lp-stall patches
 * hot_stall_wait(), so while a reader sleeps there the livepatch transition cannot finish:
 * the kernel's consistency model waits until no task has the old function on its stack.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

/* Exported for lp-stall, whose replacement function sleeps the same way. */
DECLARE_WAIT_QUEUE_HEAD(hot_stall_wq);
EXPORT_SYMBOL_GPL(hot_stall_wq);
bool hot_stall_released;
EXPORT_SYMBOL_GPL(hot_stall_released);

noinline int hot_stall_wait(void)
{
	wait_event(hot_stall_wq, READ_ONCE(hot_stall_released));
	return 0;
}
EXPORT_SYMBOL_GPL(hot_stall_wait);

static ssize_t hot_stall_read(struct file *f, char __user *buf, size_t len, loff_t *pos)
{
	static const char msg[] = "released\n";

	if (*pos > 0)
		return 0;
	hot_stall_wait();
	if (len > sizeof(msg) - 1)
		len = sizeof(msg) - 1;
	if (copy_to_user(buf, msg, len))
		return -EFAULT;
	*pos += len;
	return len;
}

static ssize_t hot_stall_write(struct file *f, const char __user *buf, size_t len, loff_t *pos)
{
	WRITE_ONCE(hot_stall_released, true);
	wake_up_all(&hot_stall_wq);
	return len;
}

static const struct proc_ops hot_stall_ops = {
	.proc_read = hot_stall_read,
	.proc_write = hot_stall_write,
};

static struct proc_dir_entry *hot_stall_entry;

static int __init stall_init(void)
{
	hot_stall_entry = proc_create("hot_stall", 0600, NULL, &hot_stall_ops);
	return hot_stall_entry ? 0 : -ENOMEM;
}

static void __exit stall_exit(void)
{
	proc_remove(hot_stall_entry);
}

module_init(stall_init);
module_exit(stall_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("hot test: a function a task can sleep in");
